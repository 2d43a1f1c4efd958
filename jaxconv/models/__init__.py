"""The model zoo: one file per family; `create_model(name)` builds any registered model, with
pretrained weights in one line (`pretrained=True` / a tag / a file / a URL)."""
from jaxconv.models.registry import (
                                     create_model,
                                     input_size,
                                     list_models,
                                     list_pretrained,
                                     pretrained_cfg,
                                     register_model,
)
from jaxconv.models.transforms import imagenet_classes, transforms

__all__ = ["create_model", "input_size", "list_models", "list_pretrained", "pretrained_cfg",
           "register_model", "transforms", "imagenet_classes"]
# Family modules register their entry points on import (one line each, below).
from jaxconv.models import googlenet, inception_v3, mobilenet, resnext, xception  # noqa: E402,F401  # noqa: E402,F401
