"""PyTorch references for jaxconv: the same ops, layers and models, with state_dict keys
identical to torchvision 0.28 / timm 1.0. Imports nothing of jaxconv."""
from torch_ref.models import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
