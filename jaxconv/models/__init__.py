"""The model zoo: one file per family; `create_model(name)` builds any registered model."""
from jaxconv.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
# Family modules register their entry points on import (one line each, below).
