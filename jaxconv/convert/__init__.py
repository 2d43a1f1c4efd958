"""torch <-> jaxconv weight conversion: one rule table, strict by default, checkpoint file IO
(torch files read without torch), pretrained weights (hub)."""
from jaxconv.convert import hub
from jaxconv.convert.io import load_checkpoint, load_weights, read_checkpoint, save_weights
from jaxconv.convert.pth import UnsafeCheckpointError
from jaxconv.convert.state import ConversionError, from_torch, to_torch

__all__ = ["ConversionError", "UnsafeCheckpointError", "from_torch", "to_torch", "load_checkpoint",
           "read_checkpoint", "save_weights", "load_weights", "hub"]
