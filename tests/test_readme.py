"""Every ```python block of README.md runs as written, in a fresh namespace (as timm and flax
test their docs): a block that stops working fails the suite. Blocks that load pretrained weights
find them in a temporary $JAXCONV_HOME, written there under their official names from
torch_ref's random initialisation (no network)."""
from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
import torch

import torch_ref
from jaxconv.models import list_pretrained, pretrained_cfg

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def _cache_weights(block: str, folder: Path) -> None:
    """The weights a block asks for, as torch_ref checkpoints under their official names."""
    for tag in list_pretrained():
        model = tag.split(".")[0]
        if f'"{model}"' in block and "pretrained" in block:
            cfg = pretrained_cfg(tag)
            kwargs = dict(cfg.model_kwargs)
            torch.manual_seed(0)
            buf = io.BytesIO()
            torch.save(torch_ref.create_model(model, **{k: v for k, v in kwargs.items()
                                                        if k != "transform_input"}).state_dict(), buf)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / cfg.file_name).write_bytes(buf.getvalue())


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 6


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path, monkeypatch):
    block = BLOCKS[index]
    monkeypatch.setenv("JAXCONV_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("JAXCONV_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    _cache_weights(block, tmp_path / "home" / "weights")
    exec(compile(block, f"README.md python block {index}", "exec"), {"__name__": "__readme__"})
