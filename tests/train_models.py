"""Small ResNeXt variants registered for the training tests (test processes only).

Registered with the public `register_model`, built from the real `jaxconv.models.resnext.ResNeXt`
(one bottleneck per stage instead of 3/4/6/3), so `train.imagenet --model resnext_tiny` in a test
exercises the same code as resnext50_32x4d at a cost two CPU cores can afford.
"""
from jaxconv.models import list_models, register_model
from jaxconv.models.resnext import ResNeXt


def resnext_tiny(**kwargs) -> ResNeXt:
    """ResNeXt with layers (1, 1, 1, 1), cardinality 4, width 4 per group."""
    return ResNeXt((1, 1, 1, 1), 4, 4, **kwargs)


if "resnext_tiny" not in list_models():
    register_model(resnext_tiny)
