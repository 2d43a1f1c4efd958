"""jaxconv's native CPU code, built on first use and registered with the XLA FFI.

Three C++ sources ship with the package: ``grouped_cpu.cc`` (jaxconv's own direct convolution
and max-pooling kernels, engine "kernel"), ``onednn.cc`` (an FFI front end to oneDNN's convolution and batch-norm
primitives, engine "onednn") and ``barrier.cc`` (the no-op behind
``ops.fusion_barrier``). Each is compiled once per machine with the system C++
compiler (``$CXX``, else ``c++``) against the FFI headers that ship with jaxlib, into
``$JAXCONV_CACHE_DIR`` (default ``~/.cache/jaxconv/kernels``), keyed by a hash of the source,
flags, compiler, jax version, CPU features and (oneDNN) the library's path; later processes load
the cached library.

oneDNN comes from the PyPI wheels ``onednn-cpu-gomp`` (libdnnl.so) and ``onednn-devel-cpu-gomp``
(headers), i.e. ``pip install jaxconv[cpu]``, or from ``$JAXCONV_ONEDNN_ROOT`` (a prefix with
``include/oneapi/dnnl/dnnl.hpp`` and ``lib/libdnnl.so*``). An engine that cannot be had (no
compiler, no oneDNN) is reported once with a warning and 'auto' uses the next one in
``jaxconv.ops.policy``'s table; forcing it raises.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax

HERE = Path(__file__).parent


@dataclasses.dataclass(frozen=True)
class Library:
    source: str
    targets: dict          # FFI target name -> exported handler symbol
    what: str              # for messages
    without: str = "'auto' uses the next engine of jaxconv.ops.policy"   # what happens then


LIBRARIES = {
    "kernel": Library("grouped_cpu.cc", {"jaxconv_grouped_conv": "JaxconvGroupedConv",
                                         "jaxconv_grouped_conv_wgrad": "JaxconvGroupedConvWgrad",
                                         "jaxconv_max_pool": "JaxconvMaxPool",
                                         "jaxconv_max_pool_bwd": "JaxconvMaxPoolBackward"},
                      "jaxconv's CPU kernels (convolution, max pooling)"),
    "onednn": Library("onednn.cc", {"jaxconv_onednn_conv": "JaxconvOnednnConv",
                                    "jaxconv_onednn_norm_bwd": "JaxconvOnednnNormBackward",
                                    "jaxconv_onednn_norm_fwd": "JaxconvOnednnNormForward"},
                      "the oneDNN engine"),
    "barrier": Library("barrier.cc", {"jaxconv_fusion_barrier": "JaxconvFusionBarrier"},
                       "jaxconv's fusion barrier",
                       "ops.fusion_barrier is the identity (same results, XLA fuses freely)"),
}
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno")
# every FFI target of this package (jax.export needs them named: see ops.lowering.EXPORT_CHECKS)
TARGETS = tuple(t for lib in LIBRARIES.values() for t in lib.targets)


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++"))


def cache_dir() -> Path:
    root = os.environ.get("JAXCONV_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "jaxconv")
    return Path(root) / "kernels"


def _cpu() -> str:
    """The instruction-set extensions -march=native compiles for (a cache shared by machines
    with different CPUs must not hand one another's library out)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.machine()


@functools.cache
def avx512() -> bool:
    """Whether this CPU has AVX-512 (avx512f), for which jaxconv's kernel is tuned."""
    return "avx512f" in _cpu().split()


@functools.cache
def bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16), so that oneDNN's bf16
    convolutions are worth having (else bf16 convs compute in float32)."""
    return {"avx512f", "avx512_bf16"} <= set(_cpu().split())


def onednn_paths() -> tuple[Path, Path]:
    """(include dir, libdnnl.so path) of oneDNN: $JAXCONV_ONEDNN_ROOT, else the PyPI wheels."""
    root = os.environ.get("JAXCONV_ONEDNN_ROOT")
    if root:
        libs = sorted(Path(root, "lib").glob("libdnnl.so*"))
        include = Path(root, "include")
    else:
        from importlib import metadata
        files = []
        for dist in ("onednn-cpu-gomp", "onednn-devel-cpu-gomp"):
            try:
                files += [Path(f.locate()) for f in metadata.distribution(dist).files or ()]
            except metadata.PackageNotFoundError:
                pass
        libs = sorted(f for f in files if f.name.startswith("libdnnl.so"))
        header = "oneapi/dnnl/dnnl.hpp"   # include/<header> inside the devel wheel
        found = [f.as_posix() for f in files if f.as_posix().endswith(header)]
        include = Path(found[0].removesuffix(header)) if found else None
    if not libs or include is None or not (include / "oneapi" / "dnnl" / "dnnl.hpp").exists():
        raise RuntimeError("oneDNN not found: install the wheels with `pip install "
                           "'jaxconv[cpu]'` (onednn-cpu-gomp and onednn-devel-cpu-gomp "
                           "2023.2.0) or set JAXCONV_ONEDNN_ROOT to a prefix with "
                           "include/oneapi/dnnl/dnnl.hpp and lib/libdnnl.so")
    return include, min(libs, key=lambda p: len(p.name))   # libdnnl.so before .so.3.2


def _build(name: str, cxx: str) -> Path:
    lib = LIBRARIES[name]
    source = HERE / lib.source
    extra: list[str] = []
    if name == "onednn":
        include, dnnl = onednn_paths()
        extra = [f"-I{include}", str(dnnl.resolve()), f"-Wl,-rpath,{dnnl.resolve().parent}"]
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join((source.read_text(), *FLAGS, *extra, version, jax.__version__,
                                    _cpu())).encode()).hexdigest()[:16]
    out = cache_dir() / f"jaxconv_{name}_{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target and rename: concurrent processes never load a partial file
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", str(source), "-o", tmp, *extra]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(f"building {lib.what} failed: {' '.join(cmd)}\n{done.stderr[-4000:]}")
    os.replace(tmp, out)
    return out


@functools.cache
def load(name: str) -> None:
    """Build (or find) engine `name`'s library and register its FFI targets for CPU; raises
    RuntimeError saying what is missing. 'xla' and 'matmul' need nothing."""
    if name in ("xla", "matmul"):
        return
    if name not in LIBRARIES:
        raise ValueError(f"engine: expected one of {sorted(LIBRARIES) + ['xla', 'matmul']}, "
                         f"got {name!r}")
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError(f"{LIBRARIES[name].what} needs a C++ compiler: none found as $CXX or "
                           f"c++ (CXX={os.environ.get('CXX')!r}); install g++ (apt-get install "
                           f"g++) or clang++")
    if name == "onednn":
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # oneDNN's threads sleep when idle
    lib = ctypes.cdll.LoadLibrary(str(_build(name, cxx)))
    for target, symbol in LIBRARIES[name].targets.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                    platform="cpu")


@functools.cache
def available(name: str) -> bool:
    """Whether engine `name` can be used in this process (building it if needed); the first
    time it cannot, a warning says why and what 'auto' does instead."""
    try:
        load(name)
    except (RuntimeError, OSError) as e:
        lib = LIBRARIES[name]
        warnings.warn(f"jaxconv: {lib.what} is unavailable; {lib.without} ({e})", stacklevel=2)
        return False
    return True
