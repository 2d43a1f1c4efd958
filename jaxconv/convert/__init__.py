"""torch <-> jaxconv weight conversion: one rule table, strict by default."""
from jaxconv.convert.state import ConversionError, from_torch, to_torch

__all__ = ["ConversionError", "from_torch", "to_torch"]
