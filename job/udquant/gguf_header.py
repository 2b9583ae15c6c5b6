"""Read a GGUF header (metadata and tensor table) without touching tensor data.

gguf's GGUFReader maps the whole file and builds arrays for every token string, which
takes ~20 s on a 248k-token vocabulary and needs the whole file on disk. This parser
works on any prefix of the file, so a remote header can be read with range requests:
it raises NeedMoreBytes with the size it needs when the prefix is too short.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from udquant.errors import CorruptGGUFError, InputError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# Arrays longer than this (token lists, merges) are summarised, not kept.
KEEP_ARRAY_LIMIT = 4096

_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}


class NeedMoreBytes(Exception):
    def __init__(self, needed: int) -> None:
        super().__init__(f"header needs at least {needed} bytes")
        self.needed = needed


class GGUFFormatError(ValueError):
    pass


@dataclass(frozen=True)
class SkippedArray:
    """A long metadata array that was skipped: its element type and length only."""

    element_type: GGUFValueType
    length: int


def ggml_type_name(ggml_type: GGMLQuantizationType) -> str:
    """The name llama.cpp prints (q6_K, q8_0, f32, iq2_xxs)."""
    name = ggml_type.name.lower()
    return name[:-2] + "_K" if name.endswith("_k") else name


GGML_TYPES_BY_NAME = {ggml_type_name(t): t for t in GGMLQuantizationType}


def parse_ggml_type(name: str) -> GGMLQuantizationType:
    """Parse a ggml type name case-insensitively, as llama-quantize does."""
    for known, ggml_type in GGML_TYPES_BY_NAME.items():
        if known.lower() == name.lower():
            return ggml_type
    raise ValueError(f"unknown ggml type {name!r}")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the row length
    ggml_type: GGMLQuantizationType
    offset: int  # relative to the start of the data section

    @property
    def type_name(self) -> str:
        return ggml_type_name(self.ggml_type)

    @property
    def n_elements(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count

    @property
    def n_bytes(self) -> int:
        block_size, type_size = GGML_QUANT_SIZES[self.ggml_type]
        return self.n_elements // block_size * type_size


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    metadata: dict[str, Any]
    tensors: tuple[TensorInfo, ...]
    data_offset: int  # where tensor data starts: the header's size with padding
    alignment: int

    @property
    def data_size(self) -> int:
        if not self.tensors:
            return 0
        last = max(self.tensors, key=lambda t: t.offset)
        return last.offset + last.n_bytes

    def tensor(self, name: str) -> TensorInfo:
        for info in self.tensors:
            if info.name == name:
                return info
        raise KeyError(name)


class _Cursor:
    def __init__(self, buf: bytes | memoryview) -> None:
        self.buf = memoryview(buf)
        self.pos = 0

    def take(self, size: int) -> memoryview:
        end = self.pos + size
        if end > len(self.buf):
            raise NeedMoreBytes(end)
        chunk = self.buf[self.pos:end]
        self.pos = end
        return chunk

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        length = self.unpack("<Q")
        if length > 1 << 24:
            raise GGUFFormatError(f"string of {length} bytes at offset {self.pos}")
        return bytes(self.take(length)).decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        self.take(self.unpack("<Q"))


def _value(cur: _Cursor, value_type: GGUFValueType) -> Any:
    if value_type == GGUFValueType.STRING:
        return cur.string()
    if value_type == GGUFValueType.ARRAY:
        element_type = GGUFValueType(cur.unpack("<I"))
        length = cur.unpack("<Q")
        if length > KEEP_ARRAY_LIMIT:
            _skip_array(cur, element_type, length)
            return SkippedArray(element_type, length)
        return [_value(cur, element_type) for _ in range(length)]
    if value_type not in _SCALAR_FORMATS:
        raise GGUFFormatError(f"unknown metadata value type {value_type}")
    return cur.unpack(_SCALAR_FORMATS[value_type])


def _skip_array(cur: _Cursor, element_type: GGUFValueType, length: int) -> None:
    if element_type == GGUFValueType.STRING:
        for _ in range(length):
            cur.skip_string()
    elif element_type == GGUFValueType.ARRAY:
        for _ in range(length):
            _value(cur, GGUFValueType.ARRAY)
    else:
        cur.take(struct.calcsize(_SCALAR_FORMATS[element_type]) * length)


def parse_gguf_header(buf: bytes | memoryview) -> GGUFHeader:
    """Parse the header at the start of buf; raise NeedMoreBytes if buf is too short."""
    cur = _Cursor(buf)
    if bytes(cur.take(4)) != GGUF_MAGIC:
        raise GGUFFormatError("bad magic (not a GGUF file)")
    version = cur.unpack("<I")
    if version not in (2, 3):
        raise GGUFFormatError(f"unsupported GGUF version {version}")
    n_tensors = cur.unpack("<Q")
    n_kv = cur.unpack("<Q")
    if n_tensors > 1 << 24 or n_kv > 1 << 24:
        raise GGUFFormatError(f"implausible counts: {n_tensors} tensors, {n_kv} keys")
    metadata: dict[str, Any] = {}
    try:
        for _ in range(n_kv):
            key = cur.string()
            metadata[key] = _value(cur, GGUFValueType(cur.unpack("<I")))
        tensors = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.unpack("<I")
            if n_dims > 8:
                raise GGUFFormatError(f"tensor {name} has {n_dims} dimensions")
            shape = tuple(cur.unpack("<Q") for _ in range(n_dims))
            ggml_type = GGMLQuantizationType(cur.unpack("<I"))
            tensors.append(TensorInfo(name, shape, ggml_type, cur.unpack("<Q")))
    except ValueError as err:
        if isinstance(err, GGUFFormatError):
            raise
        raise GGUFFormatError(str(err)) from err
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    data_offset = -(-cur.pos // alignment) * alignment
    return GGUFHeader(version, metadata, tuple(tensors), data_offset, alignment)


def read_gguf_header(path: Path, *, check_data: bool = True) -> GGUFHeader:
    """Read a local GGUF file's header; with check_data, fail if tensor data is cut short.

    A path that cannot be opened as a file is the caller's mistake (InputError); only a file whose
    content cannot be read or parsed is a CorruptGGUFError, whose hint is to delete it.
    """
    with _open_gguf(path) as f:
        try:
            size = os.fstat(f.fileno()).st_size
            chunk = 1 << 20
            while True:
                f.seek(0)
                buf = f.read(chunk)
                try:
                    header = parse_gguf_header(buf)
                    break
                except NeedMoreBytes as need:
                    if len(buf) < chunk or need.needed > size:
                        raise CorruptGGUFError(path, f"header is cut short ({size} bytes)") from None
                    chunk = max(chunk * 2, need.needed)
        except GGUFFormatError as err:
            raise CorruptGGUFError(path, str(err)) from None
        except OSError as err:
            raise CorruptGGUFError(path, err.strerror or str(err)) from None
    if check_data and header.data_offset + header.data_size > size:
        raise CorruptGGUFError(
            path, f"truncated: tensor data needs {header.data_offset + header.data_size} bytes, "
            f"the file has {size}")
    return header


def _open_gguf(path: Path) -> BinaryIO:
    try:
        return path.open("rb")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, not a GGUF file") from None
    except PermissionError:
        raise InputError(f"{path}: cannot be read: permission denied") from None
    except OSError as err:  # a path through a file (not a directory), a name too long, ...
        raise InputError(f"{path}: cannot be opened: {err.strerror or err}") from None
