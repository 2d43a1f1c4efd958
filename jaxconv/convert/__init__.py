"""torch <-> jaxconv weight conversion: one rule table, strict by default, checkpoint file IO."""
from jaxconv.convert.io import load_checkpoint, load_weights, save_weights
from jaxconv.convert.state import ConversionError, from_torch, to_torch

__all__ = ["ConversionError", "from_torch", "to_torch", "load_checkpoint", "save_weights",
           "load_weights"]
