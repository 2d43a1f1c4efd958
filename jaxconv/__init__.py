"""jaxconv: convolution variants and classic CNNs in JAX/Flax NNX, verified against PyTorch."""
__version__ = "0.1.0"
