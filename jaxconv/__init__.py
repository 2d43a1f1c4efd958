"""jaxconv: convolution variants and classic CNNs in JAX/Flax NNX, verified against PyTorch."""
from jaxconv import host_memory

__version__ = "0.1.0"

host_memory.configure()   # before any JAX computation: see jaxconv.host_memory
