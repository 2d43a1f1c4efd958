"""Pretrained weights on disk: the cache, verified downloads, and what a `pretrained=` argument
means.

Files live in ``$JAXCONV_HOME/weights`` (default ``~/.cache/jaxconv/weights``) under their
official names, so a file copied there by hand (an air-gapped machine) is used without the
network. A download streams to a temporary file in that folder, with a progress bar, and is
renamed into place only when it is complete and, where its name carries one (torchvision's
``name-<sha256 prefix>.pth``), its hash matches; a failed or interrupted download leaves
nothing behind. ``JAXCONV_OFFLINE=1`` never downloads. Weights published on the Hugging Face
Hub go through ``huggingface_hub`` and its cache when that package is installed.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from jaxconv.convert.files import atomic_write
from jaxconv.convert.state import ConversionError
from jaxconv.models.spec import hash_prefix

CHUNK = 1 << 20


class DownloadError(ConversionError):
    """Weights could not be fetched or failed verification (the message names the URL)."""


def weights_dir() -> Path:
    home = os.environ.get("JAXCONV_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "jaxconv")
    return Path(home) / "weights"


def offline() -> bool:
    return os.environ.get("JAXCONV_OFFLINE", "").lower() in ("1", "true", "yes")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def download(url: str, dest: Path, sha256: str | None = None, progress: bool = True,
             timeout: float = 60.0) -> Path:
    """Stream `url` into `dest` (atomically: a temporary file renamed when complete and
    verified). Raises DownloadError naming the URL and what was expected and got."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        response = urllib.request.urlopen(url, timeout=timeout)
    except urllib.error.HTTPError as e:
        raise DownloadError(f"pretrained: {url} answered HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, OSError) as e:
        raise DownloadError(f"pretrained: cannot reach {url} ({e})") from e
    total = int(response.headers.get("Content-Length") or 0) or None
    try:
        from tqdm import tqdm
    except ImportError:   # no progress bar without tqdm (the 'image' extra has it)
        progress = False
        tqdm = _NoBar
    got = 0
    with response, atomic_write(dest) as tmp:
        with open(tmp, "wb") as out, tqdm(total=total, unit="B", unit_scale=True,
                                          desc=dest.name, disable=not progress) as bar:
            try:
                for block in iter(lambda: response.read(CHUNK), b""):
                    out.write(block)
                    got += len(block)
                    bar.update(len(block))
            except (OSError, ValueError) as e:   # a connection cut mid-body
                raise DownloadError(f"pretrained: download of {url} broke off after {got} "
                                    f"bytes ({type(e).__name__}: {e})") from e
        if total is not None and got != total:
            raise DownloadError(f"pretrained: download of {url} is incomplete: expected {total} "
                                f"bytes, got {got}")
        if sha256 is not None:
            digest = _sha256(Path(tmp))
            if not digest.startswith(sha256):
                raise DownloadError(f"pretrained: {url} failed verification: expected a sha256 "
                                    f"starting {sha256}, got {digest}")
    return dest


class _NoBar(contextlib.nullcontext):
    """tqdm's interface, doing nothing."""

    def __init__(self, *args, **kwargs):
        super().__init__(self)

    def update(self, n):
        pass


def fetch(url: str, *, file_name: str | None = None, sha256: str | None = "name",
          hf_hub_id: str | None = None, progress: bool = True) -> Path:
    """The local path of the weights at `url` (a file:// URL is read in place): the cached
    copy under its official name (`file_name`, default the URL's) if there is one, else the
    Hugging Face Hub (when `hf_hub_id` is given and huggingface_hub is installed), else a
    download into the cache verified against `sha256` (a hash prefix; "name": the one the
    file name carries, torch.hub's check_hash convention; None: no check)."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        path = Path(urllib.request.url2pathname(parsed.path))
        if not path.is_file():
            raise DownloadError(f"pretrained: no file at {url}")
        return path
    if parsed.scheme not in ("http", "https"):
        raise DownloadError(f"pretrained: expected an http(s):// or file:// URL, got {url!r}")
    name = file_name or Path(parsed.path).name
    dest = weights_dir() / name
    if dest.is_file():
        return dest
    if hf_hub_id is not None:
        try:
            import huggingface_hub
        except ImportError:
            huggingface_hub = None
        if huggingface_hub is not None:
            try:
                return Path(huggingface_hub.hf_hub_download(
                    hf_hub_id, Path(parsed.path).name, local_files_only=offline()))
            except Exception as e:  # noqa: BLE001 (any hub failure: fall back to the URL)
                if offline():
                    raise DownloadError(_offline_message(name, url)) from e
    if offline():
        raise DownloadError(_offline_message(name, url))
    return download(url, dest, hash_prefix(name) if sha256 == "name" else sha256, progress)


def _offline_message(name: str, url: str) -> str:
    return (f"pretrained: {name} is not in the cache and JAXCONV_OFFLINE is set; download it "
            f"from {url} and put it in {weights_dir()}/ (or unset JAXCONV_OFFLINE)")


# ------------------------------------------------------------------ create_model(pretrained=)

_EXTENSIONS = (".pth", ".pt", ".bin", ".safetensors")


def resolve(spec, pretrained) -> tuple:
    """(the weights' PretrainedCfg or None, local path) for a `pretrained=` argument of model
    `spec`: True, a tag ("model.weights" or "weights"), a file, or a URL."""
    from jaxconv.models.registry import pretrained_cfg, resolve as resolve_name
    if pretrained is True:
        cfg = pretrained_cfg(spec.name)
    elif isinstance(pretrained, (str, os.PathLike)):
        arg = os.fspath(pretrained)
        if "://" in arg:
            return None, fetch(arg)
        if arg.endswith(_EXTENSIONS) or os.sep in arg:
            if not os.path.isfile(arg):
                raise ConversionError(f"pretrained: no checkpoint file at {arg!r}")
            return None, Path(arg)
        model, _, weights = arg.rpartition(".")
        if model and resolve_name(model) != spec.name:
            raise ValueError(f"pretrained: {arg!r} are weights of {resolve_name(model)}, not of "
                             f"{spec.name}")
        cfg = pretrained_cfg(weights, model=spec.name)
    else:
        raise ValueError(f"pretrained: expected False, True, a tag, a file or a URL, got "
                         f"{pretrained!r}")
    return cfg, fetch(cfg.url, file_name=cfg.file_name, sha256=cfg.sha256,
                      hf_hub_id=cfg.hf_hub_id)


def _classes_in(state: dict, kind: str, classifier: str) -> int | None:
    key = f"{classifier}.weight" if kind == "torch" else f"{classifier}.kernel"
    if key not in state:
        return None
    return int(state[key].shape[0] if kind == "torch" else state[key].shape[-1])


def build_pretrained(spec, pretrained, num_classes, kwargs: dict, rngs, new_head: bool = True):
    """The model `spec` with the weights `pretrained=` names, built from shapes alone: no
    initialiser runs except a new head's (a `num_classes` other than the weights'; with
    new_head=False that is an error naming the keys)."""
    import jax
    import numpy as np
    from flax import nnx

    from jaxconv.convert.io import as_torch_layout, read_checkpoint
    from jaxconv.convert.state import load_state

    cfg, path = resolve(spec, pretrained)
    for k, v in getattr(cfg, "model_kwargs", ()):
        kwargs.setdefault(k, v)
    state, kind = read_checkpoint(path)
    file_classes = _classes_in(state, kind, spec.classifier)
    if num_classes is None:
        num_classes = file_classes or 1000
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    model = nnx.eval_shape(lambda: spec.entry(rngs=nnx.Rngs(0), num_classes=num_classes, **kwargs))
    base = rngs()
    for i, (_, var) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.RngState))):
        var.set_value(jax.random.fold_in(base, i) if isinstance(var, nnx.RngKey)
                      else np.zeros(var.shape, var.dtype))
    if kind == "jaxconv":
        state = as_torch_layout(model, state)
    # heads the model was built without (num_classes=0, aux_logits=False): keys not wanted
    gone = tuple(f"{m}." for m in (spec.classifier, *(a.module for a in spec.aux_heads))
                 if getattr(model, m, None) is None)
    state = {k: v for k, v in state.items() if not (gone and k.startswith(gone))}
    kept = load_state(model, state, new_head=new_head and num_classes != file_classes)
    if kept:   # fresh classifier head(s) for the new class count
        model.reset_classifier(num_classes, model.global_pool, rngs=rngs)
    left = [p for p, v in nnx.to_flat_state(nnx.state(model))
            if isinstance(v.get_value(), jax.ShapeDtypeStruct)]
    if left:
        raise ConversionError(f"pretrained: {path} left {len(left)} variables unset: {left[:5]}")
    return model
