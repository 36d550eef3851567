"""TFRecord files of ``tf.train.Example`` protos, read and written without TensorFlow.

The synthesis stage loads PyTorch; with the CUDA torch build, triton's native library segfaults
at import when TensorFlow's is already in the process (issue 13: a second FMAS worker, or a
resumed one, read the existing records with TF and then died importing torch). So this side
never imports TensorFlow: the framing and the small ``Example`` proto are done here by hand and
checked byte for byte against TensorFlow's own writer in ``tests/test_tfrecord.py``.

Framing, per record (``tensorflow/core/lib/io/record_writer.cc``)::

    uint64 length (little endian) | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)

with ``masked(c) = ((c >> 15) | (c << 17)) + 0xa282ead8 (mod 2**32)`` and CRC-32C (Castagnoli).

The proto (``tensorflow/core/example/{example,feature}.proto``)::

    Example  { Features features = 1; }
    Features { map<string, Feature> feature = 1; }
    Feature  { oneof kind { BytesList bytes_list = 1; FloatList float_list = 2;
                            Int64List int64_list = 3; } }
    BytesList { repeated bytes value = 1; }   FloatList { repeated float value = 1 [packed]; }
    Int64List { repeated int64 value = 1 [packed]; }

Map entries are written sorted by key, as protobuf's deterministic serialisation does.
"""

from __future__ import annotations

import functools
import os
import struct
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

_POLY = 0x82F63B78  # CRC-32C, reflected
_MASK_DELTA = 0xA282EAD8
_M32 = 0xFFFFFFFF


class RecordError(ValueError):
    """A TFRecord file or an Example in it is damaged (truncated, corrupt, not a TFRecord)."""


# --------------------------------------------------------------------------------------------
# CRC-32C.


def _byte_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(_POLY), table >> 1).astype(np.uint32)
    return table


_TABLE = _byte_table()
_TABLE_LIST = [int(x) for x in _TABLE]


def _raw_crc_small(data: bytes, crc: int) -> int:
    table = _TABLE_LIST
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc


# A linear operator on the 32-bit CRC register (GF(2)) as four 256-entry tables, one per byte:
# op(x) = t[0][x & 255] ^ t[1][(x >> 8) & 255] ^ t[2][(x >> 16) & 255] ^ t[3][x >> 24].
def _operator_from_basis(images: np.ndarray) -> np.ndarray:
    """Tables of the operator mapping ``1 << i`` to ``images[i]`` (``[32]`` uint32)."""
    bits = (np.arange(256)[:, None] >> np.arange(8)[None, :]) & 1  # [256, 8]
    tables = np.zeros((4, 256), np.uint32)
    for j in range(4):
        for t in range(8):
            tables[j] ^= np.where(bits[:, t] == 1, images[8 * j + t], 0).astype(np.uint32)
    return tables


def _apply(op: np.ndarray, x: np.ndarray) -> np.ndarray:
    return op[0][x & 0xFF] ^ op[1][(x >> 8) & 0xFF] ^ op[2][(x >> 16) & 0xFF] ^ op[3][x >> 24]


def _compose(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a`` after ``b``."""
    basis = np.uint32(1) << np.arange(32, dtype=np.uint32)
    return _operator_from_basis(_apply(a, _apply(b, basis)))


@functools.cache
def _zeros_operator(n: int) -> np.ndarray:
    """The register after ``n`` zero bytes, as an operator of the register before them."""
    basis = np.uint32(1) << np.arange(32, dtype=np.uint32)
    one = _operator_from_basis(_TABLE[basis & 0xFF] ^ (basis >> 8))
    result, power = None, one
    while n:
        if n & 1:
            result = power if result is None else _compose(power, result)
        n >>= 1
        if n:
            power = _compose(power, power)
    return _operator_from_basis(basis) if result is None else result


def _raw_crc_parallel(data: bytes) -> int:
    """Register (start 0, no final xor) after ``data``: lanes of equal chunks run side by side,
    then are combined pairwise (``crc(AB) = zeros_op(len(B))(crc(A)) ^ crc(B)`` from register 0).
    Leading zero bytes leave a zero register unchanged, so the front is padded to whole lanes."""
    lanes = 1 << min(12, max(0, (len(data) // 256).bit_length() - 1))
    width = -(-len(data) // lanes)
    padded = np.zeros(lanes * width, np.uint8)
    padded[lanes * width - len(data) :] = np.frombuffer(data, np.uint8)
    columns = padded.reshape(lanes, width).T.copy()  # [width, lanes], rows contiguous
    crc = np.zeros(lanes, np.uint32)
    for column in columns:
        crc = _TABLE[(crc ^ column) & 0xFF] ^ (crc >> 8)
    span = width
    while len(crc) > 1:
        crc = _apply(_zeros_operator(span), crc[0::2]) ^ crc[1::2]
        span *= 2
    return int(crc[0])


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of ``data``: ``crc32c(b"123456789") == 0xE3069283``."""
    data = bytes(data)
    if len(data) < 4096:
        return _raw_crc_small(data, _M32) ^ _M32
    # Starting from 0xFFFFFFFF equals starting from 0 with the first four bytes inverted.
    head = bytes(b ^ 0xFF for b in data[:4])
    return _raw_crc_parallel(head + data[4:]) ^ _M32


def masked_crc32c(data: bytes) -> int:
    """The CRC TFRecord stores: rotated right by 15 bits plus a constant."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & _M32


# --------------------------------------------------------------------------------------------
# Framing.


def frame(data: bytes) -> bytes:
    """One record as TFRecord bytes."""
    length = struct.pack("<Q", len(data))
    return b"".join(
        (
            length,
            struct.pack("<I", masked_crc32c(length)),
            data,
            struct.pack("<I", masked_crc32c(data)),
        )
    )


def write_records(path: str | os.PathLike, records: Sequence[bytes]) -> None:
    """Writes ``records`` as a TFRecord file at ``path`` (uncompressed), flushed to disk."""
    with open(path, "wb") as fh:
        for data in records:
            fh.write(frame(data))
        fh.flush()
        os.fsync(fh.fileno())


def read_records(path: str | os.PathLike, *, verify: bool = True) -> Iterator[bytes]:
    """Yields the records of a TFRecord file.

    Raises:
      RecordError: the file is truncated or a checksum does not match (names the file and the
        record's byte offset).
    """
    path = Path(path)
    with open(path, "rb") as fh:
        index = 0
        while True:
            offset = fh.tell()
            header = fh.read(12)
            if not header:
                return
            if len(header) < 12:
                raise RecordError(_damaged(path, index, offset, "truncated length header"))
            length_bytes, length_crc = header[:8], struct.unpack("<I", header[8:])[0]
            if masked_crc32c(length_bytes) != length_crc:
                raise RecordError(_damaged(path, index, offset, "corrupt length"))
            (length,) = struct.unpack("<Q", length_bytes)
            data = fh.read(length)
            footer = fh.read(4)
            if len(data) < length or len(footer) < 4:
                raise RecordError(_damaged(path, index, offset, "truncated data"))
            if verify and masked_crc32c(data) != struct.unpack("<I", footer)[0]:
                raise RecordError(_damaged(path, index, offset, "data checksum mismatch"))
            yield data
            index += 1


def _damaged(path: Path, index: int, offset: int, what: str) -> str:
    return (
        f"{path} is damaged at record {index} (byte {offset}: {what}). It is not a complete "
        "TFRecord file: delete it and re-run the command that wrote it (FMAS redoes its images)."
    )


# --------------------------------------------------------------------------------------------
# The Example proto.

Value = bytes | str | float | int
FeatureValue = Value | Sequence[Value]


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 as two's complement, as protobuf does
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _feature(values: FeatureValue) -> bytes:
    if isinstance(values, bytes | str | float | int | np.generic):
        values = [values]
    values = list(values)
    if not values:
        raise ValueError("A feature needs at least one value (its kind is taken from them).")
    if all(isinstance(v, bytes | str) for v in values):
        payload = b"".join(_field(1, v.encode() if isinstance(v, str) else v) for v in values)
        return _field(1, payload)
    if all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in values):
        return _field(3, _field(1, b"".join(_varint(int(v)) for v in values)))
    if all(isinstance(v, float | np.floating) for v in values):
        return _field(2, _field(1, np.asarray(values, "<f4").tobytes()))
    raise TypeError(f"Feature values must be all bytes/str, all int or all float: {values!r}")


def encode_example(features: Mapping[str, FeatureValue]) -> bytes:
    """A serialised ``tf.train.Example`` (what ``SerializeToString(deterministic=True)`` gives).

    Args:
      features: name -> one value or a list of values, all ``bytes``/``str`` (``bytes_list``),
        all ``int`` (``int64_list``) or all ``float`` (``float_list``, stored as float32).
    """
    entries = b"".join(
        _field(1, _field(1, name.encode()) + _field(2, _feature(features[name])))
        for name in sorted(features)
    )
    return _field(1, entries)


def _varint_at(data: bytes, pos: int, what: str) -> tuple[int, int]:
    """``(value, next position)`` of the varint at ``pos``."""
    shift = result = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise RecordError(f"Malformed Example ({what}): bad varint.")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(data: bytes, what: str) -> Iterator[tuple[int, int, bytes | int]]:
    """``(number, wire_type, value)`` of each field of one message."""
    pos = 0
    while pos < len(data):
        key, pos = _varint_at(data, pos, what)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint_at(data, pos, what)
            yield number, wire, value
            continue
        if wire == 2:
            n, pos = _varint_at(data, pos, what)
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
        else:
            raise RecordError(f"Malformed Example ({what}): wire type {wire}.")
        if pos + n > len(data):
            raise RecordError(f"Malformed Example ({what}): a field runs past its message.")
        yield number, wire, data[pos : pos + n]
        pos += n


def _signed64(n: int) -> int:
    return n - (1 << 64) if n >= 1 << 63 else n


def _parse_feature(data: bytes, name: str) -> list[bytes] | list[int] | list[float]:
    """One ``Feature``: its list's values; packed and unpacked numbers are both accepted."""
    kind, values = None, []
    for number, _, payload in _fields(data, name):
        kind = number
        for item_number, wire, item in _fields(payload, name):
            if item_number != 1:
                continue
            if number == 2 and wire in (2, 5):  # a packed run of float32, or one
                values.extend(float(v) for v in np.frombuffer(item, "<f4"))
            elif number == 3 and wire == 0:
                values.append(_signed64(item))
            elif number == 3 and wire == 2:  # packed varints
                pos = 0
                while pos < len(item):
                    value, pos = _varint_at(item, pos, name)
                    values.append(_signed64(value))
            elif number == 1 and wire == 2:
                values.append(item)
            else:
                raise RecordError(f"Malformed Example: feature {name!r} has a bad value.")
    if kind not in (1, 2, 3):
        raise RecordError(f"Malformed Example: feature {name!r} has no bytes, float or int list.")
    return values


def parse_example(
    data: bytes, *, names: Sequence[str] | None = None
) -> dict[str, list[bytes] | list[int] | list[float]]:
    """The features of a serialised ``tf.train.Example`` as ``name -> list of values``.

    Args:
      data: the serialised proto.
      names: decode only these features (others are skipped undecoded); default all.

    Raises:
      RecordError: the bytes are not a well-formed Example.
    """
    wanted = None if names is None else set(names)
    out = {}
    for number, wire, features in _fields(data, "Example"):
        if number != 1 or wire != 2:
            continue
        for entry_number, entry_wire, entry in _fields(features, "Features"):
            if entry_number != 1 or entry_wire != 2:
                continue
            name, value = None, b""
            for n, w, v in _fields(entry, "map entry"):
                if n == 1 and w == 2:
                    name = v.decode("utf-8", errors="replace")
                elif n == 2 and w == 2:
                    value = v
            if name is None:
                raise RecordError("Malformed Example: a feature without a name.")
            if wanted is None or name in wanted:
                out[name] = _parse_feature(value, name)
    return out
