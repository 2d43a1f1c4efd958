"""torch checkpoints (.pth / .pt / .bin) read without torch, as numpy arrays.

Both formats ``torch.save`` writes are read: the zip archive (the default since torch 1.6:
``<name>/data.pkl`` plus one ``<name>/data/<key>`` record of raw little-endian bytes per
storage) and the legacy one (``_use_new_zipfile_serialization=False``: a magic number, a few
pickles, then each storage as an int64 element count and its bytes). The pickle is read by a
restricted unpickler that resolves only what ``torch.load(weights_only=True)`` needs for a
state_dict (tensor and parameter rebuilds, storage types, OrderedDict and plain containers);
any other global, i.e. anything that could run code, is refused with `UnsafeCheckpointError`
before it is looked up. Tensors come back as numpy arrays equal to torch's bit for bit
(bfloat16 as ml_dtypes.bfloat16).
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np

from jaxconv.convert.state import ConversionError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class UnsafeCheckpointError(ConversionError):
    """The checkpoint's pickle refers to something a weights-only load does not allow."""


class _StorageType:
    def __init__(self, name: str):
        self.dtype = np.dtype(_STORAGES[name])


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    size, stride = tuple(size), tuple(stride)
    if not size:
        return storage[storage_offset:storage_offset + 1].reshape(()).copy()
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(storage[storage_offset:], size,
                                           tuple(s * itemsize for s in stride))
    return np.ascontiguousarray(view)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    return data


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch", "Size"): tuple,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, load_storage, path):
        super().__init__(file)
        self._load_storage, self._path = load_storage, path

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGES:
            return _StorageType(name)
        raise UnsafeCheckpointError(
            f"path: {self._path!r} refers to {module}.{name}, which a weights-only load does "
            f"not allow (loading it could run code); only tensors, parameters and containers "
            f"of them are read. If you trust the file, load it with torch.load(weights_only="
            f"False) and pass the state_dict.")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise UnsafeCheckpointError(f"path: {self._path!r} has an unexpected persistent "
                                        f"reference {str(pid)[:80]}")
        _, storage_type, key, _location, numel = pid[:5]
        return self._load_storage(str(key), storage_type.dtype, int(numel))


def _read_zip(path: str):
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl is None:
            raise ConversionError(f"path: {path!r} is a zip file but not a torch checkpoint "
                                  f"(no data.pkl; entries: {names[:5]})")
        prefix = pkl[: -len("data.pkl")]
        order = z.read(prefix + "byteorder").decode() if prefix + "byteorder" in names else "little"
        if order != "little":
            raise ConversionError(f"path: {path!r} was saved big-endian; not supported")

        def load_storage(key, dtype, numel):
            raw = z.read(f"{prefix}data/{key}")
            return np.frombuffer(raw, dtype=dtype, count=numel)

        return _Unpickler(io.BytesIO(z.read(pkl)), load_storage, path).load()


def _read_legacy(path: str):
    """The legacy format: the object's pickle refers to storages whose bytes come after it, so
    it is read twice: once to learn the storages, then (their bytes read) for real."""
    with open(path, "rb") as f:
        shapes: dict[str, tuple] = {}

        def declare(key, dtype, numel):
            shapes[key] = (dtype, numel)
            return np.zeros(numel, dtype)

        if _Unpickler(f, declare, path).load() != LEGACY_MAGIC:
            raise ConversionError(f"path: {path!r} is not a torch checkpoint (no zip archive, "
                                  f"no legacy magic number)")
        _Unpickler(f, declare, path).load()   # protocol version
        _Unpickler(f, declare, path).load()   # sys_info
        start = f.tell()
        _Unpickler(f, declare, path).load()   # the object, for its storages
        storages = {}
        for key in _Unpickler(f, declare, path).load():
            dtype, numel = shapes[str(key)]
            (count,) = struct.unpack("<q", f.read(8))
            raw = f.read(numel * np.dtype(dtype).itemsize)
            if count != numel or len(raw) != numel * np.dtype(dtype).itemsize:
                raise ConversionError(f"path: {path!r} is truncated (storage {key})")
            storages[str(key)] = np.frombuffer(raw, dtype)
        f.seek(start)
        return _Unpickler(f, lambda key, dtype, numel: storages[key], path).load()


def load(path: str | os.PathLike):
    """The object a torch checkpoint holds (usually a state_dict), tensors as numpy arrays.

    Raises UnsafeCheckpointError for pickles that reference anything but tensors and plain
    containers, and ConversionError naming the file for truncated or foreign files."""
    path = os.fspath(path)
    try:
        if zipfile.is_zipfile(path):
            return _read_zip(path)
        return _read_legacy(path)
    except ConversionError:
        raise
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, KeyError, ValueError,
            struct.error, OSError) as e:
        raise ConversionError(f"path: cannot read torch checkpoint {path!r} "
                              f"({type(e).__name__}: {e})") from e
