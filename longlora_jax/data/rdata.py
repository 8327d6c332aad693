"""Reader for R serialization (XDR format, versions 2 and 3) and R lazy-load databases.

Enough of R's `serialize()` format for data objects: NULL, character / logical / integer /
double / complex / raw vectors, lists, pairlists, symbols, references and attributes, plus the
common ALTREP encodings (compact sequences, wrappers). Closures, environments and byte code are
refused with a clear error. A lazy-load database (`Rdata.rdb` + `Rdata.rdx`, what
`LazyData: true` packages ship) maps object names to zlib/bzip2/xz-compressed serializations.

    objects = read_lazyload_db("data/Rdata.rdx", "data/Rdata.rdb")
    lines = objects["prideprejudice"].data          # list[str | None] (None = NA)
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import lzma
import pathlib
import struct
import zlib
from typing import Any

import numpy as np

# SEXP type codes (R's Rinternals.h) and serialization pseudo-types (serialize.c).
NILSXP, SYMSXP, LISTSXP, CLOSXP, ENVSXP, PROMSXP, LANGSXP = 0, 1, 2, 3, 4, 5, 6
CHARSXP, LGLSXP, INTSXP, REALSXP, CPLXSXP, STRSXP = 9, 10, 13, 14, 15, 16
DOTSXP, VECSXP, EXPRSXP, RAWSXP, S4SXP = 17, 19, 20, 24, 25
REFSXP, NILVALUE_SXP, GLOBALENV_SXP, UNBOUNDVALUE_SXP, MISSINGARG_SXP = 255, 254, 253, 252, 251
BASENAMESPACE_SXP, NAMESPACESXP, PACKAGESXP, PERSISTSXP = 250, 249, 248, 247
EMPTYENV_SXP, BASEENV_SXP, ATTRLANGSXP, ATTRLISTSXP, ALTREP_SXP = 242, 241, 240, 239, 238

_SINGLETONS = {
    GLOBALENV_SXP: "R_GlobalEnv", UNBOUNDVALUE_SXP: "R_UnboundValue",
    MISSINGARG_SXP: "R_MissingArg", BASENAMESPACE_SXP: "R_BaseNamespace",
    EMPTYENV_SXP: "R_EmptyEnv", BASEENV_SXP: "R_BaseEnv",
}
_PAIRLIST_TYPES = {LISTSXP, LANGSXP, DOTSXP, ATTRLANGSXP, ATTRLISTSXP}
_NUMERIC_DTYPES = {LGLSXP: ">i4", INTSXP: ">i4", REALSXP: ">f8", CPLXSXP: ">c16"}
_UTF8_MASK, _LATIN1_MASK, _BYTES_MASK = 1 << 3, 1 << 2, 1 << 1


class RDataError(ValueError):
    """The R serialization stream is malformed or uses a feature this reader does not support."""


@dataclasses.dataclass
class RObject:
    """One deserialized R object.

    `data` by type: STRSXP -> list[str | None]; LGLSXP/INTSXP/REALSXP/CPLXSXP -> np.ndarray
    (NA as R's sentinels); RAWSXP -> bytes; VECSXP/EXPRSXP -> list; pairlists -> list of
    (tag | None, value); SYMSXP -> str; NILSXP -> None. `attributes` maps names to values.
    """

    sexptype: int
    data: Any
    attributes: dict[str, Any] = dataclasses.field(default_factory=dict)

    def named(self) -> dict[str, Any]:
        """A list or vector with a `names` attribute as a dict name -> element."""
        names = self.attributes.get("names")
        if names is None:
            raise RDataError(f"R object of type {self.sexptype} has no names attribute")
        return dict(zip(names.data, self.data, strict=True))


_NULL = RObject(NILSXP, None)


class _Reader:
    """Reads one XDR serialization stream (R's `unserialize`)."""

    def __init__(self, buf: bytes):
        self._buf = buf
        self._pos = 0
        self._refs: list[RObject] = []

    def _take(self, n: int) -> bytes:
        if self._pos + n > len(self._buf):
            raise RDataError(f"R serialization stream truncated at byte {self._pos} (+{n})")
        out = self._buf[self._pos:self._pos + n]
        self._pos += n
        return out

    def _int(self) -> int:
        return struct.unpack(">i", self._take(4))[0]

    def _length(self) -> int:
        n = self._int()
        if n == -1:  # long vector: two more ints, upper then lower 32 bits
            upper, lower = self._int(), self._int()
            n = (upper << 32) + lower
        return n

    def read(self) -> RObject:
        fmt = self._take(2)
        if fmt != b"X\n":
            raise RDataError(f"unsupported R serialization format {fmt!r} (only XDR 'X\\n')")
        version = self._int()
        self._int(), self._int()  # writer R version, minimal reader R version
        if version == 3:
            self._take(self._int())  # native encoding name, e.g. b"UTF-8"
        elif version != 2:
            raise RDataError(f"unsupported R serialization version {version} (2 or 3)")
        return self._item()

    def _item(self) -> RObject:
        flags = self._int()
        sexptype, levels = flags & 0xFF, flags >> 12
        has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if sexptype == NILVALUE_SXP:
            return _NULL
        if sexptype in _SINGLETONS:
            return RObject(sexptype, _SINGLETONS[sexptype])
        if sexptype == REFSXP:
            index = flags >> 8 or self._int()
            return self._refs[index - 1]
        if sexptype == SYMSXP:
            obj = RObject(SYMSXP, self._item().data)
            self._refs.append(obj)
            return obj
        if sexptype in (PACKAGESXP, NAMESPACESXP):
            self._int()  # InStringVec: a zero, then a character vector
            obj = RObject(sexptype, [self._item().data for _ in range(self._int())])
            self._refs.append(obj)
            return obj
        if sexptype in _PAIRLIST_TYPES:
            return self._pairlist(sexptype, has_attr, has_tag)
        if sexptype == ALTREP_SXP:
            return self._altrep()
        if sexptype == CHARSXP:
            obj = RObject(CHARSXP, self._charsxp(levels))
            if has_attr:
                self._item()  # a CHARSXP cache entry, never meaningful on read
            return obj
        obj = RObject(sexptype, self._vector(sexptype))
        if has_attr:
            obj.attributes = self._attributes(self._item())
        return obj

    def _charsxp(self, levels: int) -> str | None:
        n = self._int()
        if n == -1:
            return None
        raw = self._take(n)
        if levels & _BYTES_MASK:
            return raw.decode("latin-1")
        if levels & _LATIN1_MASK and not levels & _UTF8_MASK:
            return raw.decode("latin-1")
        return raw.decode("utf-8")

    def _vector(self, sexptype: int) -> Any:
        if sexptype in _NUMERIC_DTYPES:
            n = self._length()
            dtype = np.dtype(_NUMERIC_DTYPES[sexptype])
            raw = self._take(n * dtype.itemsize)
            return np.frombuffer(raw, dtype).astype(dtype.newbyteorder("="))
        if sexptype == STRSXP:
            return [self._item().data for _ in range(self._length())]
        if sexptype in (VECSXP, EXPRSXP):
            return [self._item() for _ in range(self._length())]
        if sexptype == RAWSXP:
            return self._take(self._length())
        if sexptype == S4SXP:
            return None
        raise RDataError(f"unsupported R object type {sexptype} (data objects only: no "
                         "closures, environments, byte code or external pointers)")

    def _pairlist(self, sexptype: int, has_attr: bool, has_tag: bool) -> RObject:
        """A pairlist read iteratively: attributes?, tag?, CAR, then the CDR chain."""
        obj = RObject(sexptype, [])
        while True:
            attrs = self._item() if has_attr else None
            tag = self._item().data if has_tag else None
            obj.data.append((tag, self._item()))
            if attrs is not None and not obj.attributes:
                obj.attributes = self._attributes(attrs)
            flags = self._int()
            sexptype = flags & 0xFF
            if sexptype == NILVALUE_SXP:
                return obj
            if sexptype not in _PAIRLIST_TYPES:
                raise RDataError(f"pairlist tail of R type {sexptype} is not supported")
            has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))

    def _attributes(self, pairlist: RObject) -> dict[str, Any]:
        if pairlist.sexptype == NILSXP:
            return {}
        return {tag: value for tag, value in pairlist.data}

    def _altrep(self) -> RObject:
        """ALTREP: (class info pairlist, state, attributes); compact sequences and wrappers."""
        info, state, attrs = self._item(), self._item(), self._item()
        klass = info.data[0][1].data
        if klass == "compact_intseq":
            n, start, step = (int(v) for v in state.data)
            obj = RObject(INTSXP, np.arange(n, dtype=np.int32) * step + start)
        elif klass == "compact_realseq":
            n, start, step = state.data
            obj = RObject(REALSXP, np.arange(int(n), dtype=np.float64) * step + start)
        elif klass.startswith("wrap_"):
            obj = dataclasses.replace(state.data[0])
        else:
            raise RDataError(f"unsupported ALTREP class {klass!r}")
        obj.attributes = self._attributes(attrs)
        return obj


def unserialize(buf: bytes) -> RObject:
    """Deserializes one R object from an XDR serialization stream (R's `unserialize`)."""
    return _Reader(buf).read()


def _decompress_entry(blob: bytes, compression: int) -> bytes:
    """One lazy-load DB entry: 4-byte big-endian length, [type byte,] compressed payload."""
    (size,) = struct.unpack(">I", blob[:4])
    if compression == 1:
        out = zlib.decompress(blob[4:])
    else:
        kind, payload = blob[4:5], blob[5:]
        decoders = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress,
                    b"0": bytes}
        if kind not in decoders:
            raise RDataError(f"unknown lazy-load DB compression type {kind!r}")
        out = decoders[kind](payload)
    if len(out) != size:
        raise RDataError(f"lazy-load DB entry decompressed to {len(out)} bytes, expected {size}")
    return out


def read_lazyload_db(rdx_path: str | pathlib.Path, rdb_path: str | pathlib.Path
                     ) -> dict[str, RObject]:
    """All objects of an R lazy-load database: the .rdx index (gzip'd serialization of
    list(variables=, references=, compressed=)) maps names to (offset, length) in the .rdb."""
    index = unserialize(gzip.decompress(pathlib.Path(rdx_path).read_bytes())).named()
    compression = int(index["compressed"].data[0])
    rdb = pathlib.Path(rdb_path).read_bytes()
    objects = {}
    for name, where in index["variables"].named().items():
        offset, length = (int(v) for v in where.data)
        objects[name] = unserialize(_decompress_entry(rdb[offset:offset + length], compression))
    return objects
