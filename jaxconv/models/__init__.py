"""The model zoo: one file per family; `create_model(name)` builds any registered model."""
from jaxconv.models.registry import create_model, input_size, list_models, register_model

__all__ = ["create_model", "input_size", "list_models", "register_model"]
# Family modules register their entry points on import (one line each, below).
from jaxconv.models import googlenet, inception_v3, mobilenet, resnext, xception  # noqa: F401  # noqa: F401
