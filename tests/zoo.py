"""What the model test files share: the torchvision / timm reference fixture, which registered
models are heavy, and parameterisation over a model registry."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "reference_state_dicts.json"
# fixture entries named after timm's model, not ours
FIXTURE_KEY = {"xception": "legacy_xception", "mobilenet_v1": "mobilenetv1_100"}
BIG = {"resnext101_32x8d", "resnext101_64x4d", "resnext152_32x4d"}
# compiled checks at real sizes under -m slow only: the big variants and the deformable ResNeXt
# (jaxconv.ops.deform has its own parity tests; its wiring is checked by the small-input tests)
HEAVY = BIG | {"resnext50_32x4d_dcn"}


def reference(name: str) -> dict | None:
    """The fixture's entry for a registered model ({'state_dict': {key: shape}, 'num_params'}),
    or None for models without a torchvision / timm counterpart."""
    return json.loads(FIXTURE.read_text()).get(FIXTURE_KEY.get(name, name))


def params(names, slow=frozenset(), only=None) -> list:
    """pytest params over `names` (restricted to `only`), those in `slow` marked slow."""
    return [pytest.param(n, id=n, marks=[pytest.mark.slow] if n in slow else [])
            for n in names if only is None or n in only]
