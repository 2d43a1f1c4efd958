"""Forward hooks for NNX modules (torch's ``register_forward_hook``, for a `with` block): the
model summary and the layer-by-layer port comparison observe calls through this one mechanism."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable


@contextlib.contextmanager
def recording(classes: Iterable[type], hook: Callable):
    """While the block runs, every call of a module of `classes` (or of a subclass that inherits
    their ``__call__``) also calls ``hook(module, args, output)``. Works under tracing, as the
    hook runs in Python when the module does."""
    originals = {cls: cls.__dict__["__call__"] for cls in set(classes)}

    def wrap(call):
        def recorded(self, *args, **kwargs):
            out = call(self, *args, **kwargs)
            hook(self, args, out)
            return out
        return recorded

    for cls, call in originals.items():
        cls.__call__ = wrap(call)
    try:
        yield
    finally:
        for cls, call in originals.items():
            cls.__call__ = call
