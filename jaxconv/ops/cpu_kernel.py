"""The C++ grouped-convolution kernel for XLA:CPU (grouped_cpu.cc), built on first use.

XLA:CPU has no grouped-convolution kernel and no pure-JAX formulation reaches oneDNN's speed
on ResNeXt's narrow groups (BENCHMARKS.md), so ``jaxconv.ops.grouped`` calls this direct
convolution through the XLA FFI. The source is compiled once per machine with the system C++
compiler (``$CXX``, else ``c++``; ``-O3 -march=native``) against the FFI headers that ship with
jaxlib, into ``$JAXCONV_CACHE_DIR`` (default ``~/.cache/jaxconv/kernels``), keyed by a hash of
the source, the flags, the compiler, jax's version and the CPU's features; later processes
load the cached library. With no compiler, ``available()`` is False and 'auto' keeps the pure-JAX
formulations (forcing 'kernel' then raises).
"""
from __future__ import annotations

import ctypes
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

SOURCE = Path(__file__).with_name("grouped_cpu.cc")
TARGETS = {"jaxconv_grouped_conv": "JaxconvGroupedConv",
           "jaxconv_grouped_conv_wgrad": "JaxconvGroupedConvWgrad"}
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno")


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++"))


def _cache_dir() -> Path:
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


def _build(cxx: str) -> Path:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join((SOURCE.read_text(), *FLAGS, version, jax.__version__,
                                    _cpu())).encode()).hexdigest()[:16]
    lib = _cache_dir() / f"jaxconv_cpu_{key}.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target and rename: concurrent processes never load a partial file
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
    os.close(fd)
    cmd = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(f"building the jaxconv CPU kernel failed: {' '.join(cmd)}\n"
                           f"{done.stderr[-4000:]}")
    os.replace(tmp, lib)
    return lib


@functools.cache
def load() -> None:
    """Build (or find) the library and register its FFI targets for the CPU platform."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("the jaxconv CPU kernel needs a C++ compiler: none found as "
                           f"$CXX or c++ (got CXX={os.environ.get('CXX')!r}); install g++ or "
                           "use another grouped lowering")
    lib = ctypes.cdll.LoadLibrary(str(_build(cxx)))
    for name, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)),
                                    platform="cpu")


@functools.cache
def available() -> bool:
    """Whether the kernel can be used in this process (building it if needed)."""
    try:
        load()
    except (RuntimeError, OSError) as e:
        warnings.warn(f"jaxconv: the CPU grouped-conv kernel is unavailable, grouped and "
                      f"depthwise convs use the slower pure-JAX formulations ({e})", stacklevel=2)
        return False
    return True
