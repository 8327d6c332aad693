"""PyTorch `torch.save` files read without PyTorch, by an unpickler that can execute nothing.

A `torch.save` file (PyTorch >= 1.6) is a zip: `<name>/data.pkl` pickles the object with
tensors as calls of `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` on
storages kept as `<name>/data/<key>` raw bytes. `load_torch_file` runs that pickle with an
unpickler whose `find_class` knows exactly these names and maps them to local functions that
build numpy arrays: `collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`,
`torch._utils._rebuild_parameter` and the `torch.<Type>Storage` dtype markers. Any other
global (`os.system`, `builtins.eval`, a class with a `__reduce__`, ...) is refused with a
`CheckpointError` before anything runs. Legacy (pre-1.6, non-zip) files are refused with how
to convert them. bf16 tensors come back as `ml_dtypes.bfloat16` arrays.
"""

from __future__ import annotations

import collections
import io
import math
import pathlib
import pickle
import pickletools
import struct
import zipfile
import zlib
from typing import Any

import ml_dtypes
import numpy as np

from longlora_jax.errors import CheckpointError, first_line

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_CONVERT = ("convert it once where PyTorch is installed: torch.save(torch.load(f), f) for a "
            "legacy file, or save_file(state_dict, 'x.safetensors') with safetensors")


class _StorageType:
    """A `torch.<Type>Storage` class as the pickle names it: only its element type."""

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)


def _rebuild_tensor(storage: np.ndarray, offset: int, size, stride, *_ignored) -> np.ndarray:
    """`torch._utils._rebuild_tensor_v2`: a strided view of `storage`, copied contiguous."""
    size, stride = tuple(size), tuple(stride)
    if not isinstance(storage, np.ndarray) or not all(
            isinstance(n, int) and n >= 0 for n in (offset, *size, *stride)):
        raise CheckpointError(f"tensor view (offset {offset!r:.40}, size {size!r:.80}, stride "
                              f"{stride!r:.80}) is not a view of a storage")
    extent = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) + 1
    if size and (min(size) == 0):
        return np.empty(size, storage.dtype)
    if extent > storage.size or math.prod(size) > storage.size:
        raise CheckpointError(f"tensor view (offset {offset}, size {size!s:.80}, stride "
                              f"{stride!s:.80}) does not fit its storage of {storage.size} "
                              "elements (or repeats its elements)")
    item = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size,
                                           strides=[s * item for s in stride], writeable=False)
    return np.array(view)


def _rebuild_parameter(data: np.ndarray, *_ignored) -> np.ndarray:
    """`torch._utils._rebuild_parameter`: a Parameter is its data."""
    return data


class _TensorUnpickler(pickle.Unpickler):
    """Resolves only the globals a tensor state dict needs; storages come from the zip."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, source: str, swap: bool):
        super().__init__(file)
        self.archive, self.prefix, self.source, self.swap = archive, prefix, source, swap

    def find_class(self, module: str, name: str) -> Any:
        allowed = {
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        }
        if (module, name) in allowed:
            return allowed[module, name]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        raise CheckpointError(f"{self.source}: refusing the pickled global {module}.{name} "
                              "(only tensors are read from PyTorch files)")

    def persistent_load(self, pid) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise CheckpointError(f"{self.source}: unexpected persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        raw = self.archive.read(f"{self.prefix}/data/{key}")
        array = np.frombuffer(raw, dtype=storage_type.dtype, count=int(numel))
        return array.byteswap() if self.swap else array


def load_torch_file(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """{name: numpy array} of a `torch.save`d state dict, executing nothing (module doc).

    CheckpointError (one line) for anything else: a legacy or damaged file, a pickle that
    asks for any other global, tensors that do not fit their storages.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(f"PyTorch file {str(path)!r} does not exist")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is a legacy (pre-1.6) PyTorch file, which is never "
                              f"unpickled; {_CONVERT}")
    try:
        return _load(path)
    except CheckpointError:
        raise
    except _MALFORMED as err:
        raise CheckpointError(f"{path}: not a readable torch.save file ({type(err).__name__}: "
                              f"{first_line(err)[:200]})") from None


# What a damaged zip or pickle raises while it is read (the stdlib's zipfile, zlib and
# pickle, and numpy building the arrays): each is a refusal of the file, never a crash.
_MALFORMED = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError,
              pickle.UnpicklingError, ValueError, TypeError, KeyError, IndexError,
              AttributeError, OverflowError, struct.error, RecursionError, NotImplementedError)


def _check_opcodes(pickled: bytes, source: str) -> None:
    """CheckpointError for a pickle whose opcodes claim more than it holds. The unpickler
    allocates what an opcode claims before reading it (a frame, a string's length) and grows
    its memo to the largest index it is told to store at; `pickletools.genops` reads every
    opcode without allocating more than is there (ValueError: an argument is cut short), and
    frames and memo indices are checked against the pickle's size here."""
    for opcode, arg, pos in pickletools.genops(pickled):
        if opcode.name == "FRAME" and arg > len(pickled) - pos:
            raise CheckpointError(f"{source}: a pickle frame claims {arg} bytes, more than the "
                                  f"{len(pickled) - pos} left")
        if opcode.name in ("PUT", "BINPUT", "LONG_BINPUT") and int(arg) > len(pickled):
            raise CheckpointError(f"{source}: a pickle memo index {arg} is beyond anything a "
                                  f"{len(pickled)}-byte pickle can hold")


def _load(path: pathlib.Path) -> dict[str, np.ndarray]:
    size = path.stat().st_size
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():  # a zip bomb would allocate far beyond the file
            if info.file_size > size:
                raise CheckpointError(f"{path}: entry {info.filename!r:.80} claims "
                                      f"{info.file_size} bytes, more than the file's {size}")
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise CheckpointError(f"{path}: not a torch.save archive (found {len(pickles)} "
                                  "data.pkl entries)")
        prefix = pickles[0][:-len("/data.pkl")]
        order = f"{prefix}/byteorder"
        swap = order in archive.namelist() and archive.read(order).decode().strip() == "big"
        pickled = archive.read(pickles[0])
        _check_opcodes(pickled, str(path))
        state = _TensorUnpickler(io.BytesIO(pickled), archive, prefix, str(path), swap).load()
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, np.ndarray) for k, v in state.items()):
        raise CheckpointError(f"{path}: expected a state dict of named tensors, got a "
                              f"{type(state).__name__}")
    return dict(state)
