"""Smoke test of the built wheel, run by `make package` from outside the repository with the
wheel installed (no dependencies) into an empty folder first on PYTHONPATH: jaxconv must come
from there, build its CPU engines (its kernel, and oneDNN's front end against the oneDNN
wheels) from the installed package data, and run a model."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

site, wheel = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
names = zipfile.ZipFile(wheel).namelist()
for source in ("grouped_cpu.cc", "onednn.cc"):
    assert any(n.endswith(f"jaxconv/ops/{source}") for n in names), f"{source} not in the wheel"
assert not any(n.startswith(("tests/", "parity_tests/")) for n in names), "tests in the wheel"

import jax.numpy as jnp  # noqa: E402

import jaxconv  # noqa: E402
from jaxconv import config  # noqa: E402
from jaxconv.models import create_model  # noqa: E402
from jaxconv.ops import native  # noqa: E402

assert Path(jaxconv.__file__).resolve().is_relative_to(site), f"jaxconv imported from {jaxconv.__file__}"
assert native.HERE.resolve().is_relative_to(site)
assert native.available("kernel") and native.available("onednn"), "engines not built"
model = create_model("resnext50_32x4d", num_classes=10)
model.eval()
with config.use_conv_lowering("auto"):
    y = model(jnp.ones((1, 64, 64, 3)))
assert y.shape == (1, 10) and bool(jnp.isfinite(y).all())
subprocess.run([sys.executable, "-m", "jaxconv.verify", "--ops"], check=True,
               stdout=subprocess.DEVNULL, env=os.environ)
print(f"wheel OK: {wheel.name} ({len(names)} files), jaxconv from {site}, engines built, "
      f"resnext50_32x4d ran, verify --ops passed")
