"""Protocol Buffers' binary wire format, the small part of it the Tinker SDK's training and sampling
messages use: varints, length-delimited fields (strings, bytes, messages, packed numbers) and 64-bit
doubles. Written from the public encoding spec (protobuf.dev/programming-guides/encoding) so the server
needs neither protoc nor the SDK's generated module.

A message parses into ``{field number: [values]}``: an int for a varint, ``bytes`` for a length-delimited
field, and the raw 8 or 4 bytes of a fixed-width field. Malformed input raises `WireError`.
"""

from __future__ import annotations

import struct

VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise WireError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise WireError("varint longer than 10 bytes")


def parse(buf: bytes) -> dict[int, list]:
    """Every field of one message, in order of appearance per field number."""
    fields: dict[int, list] = {}
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise WireError("field number 0")
        if wire_type == VARINT:
            value, pos = _read_varint(buf, pos)
        elif wire_type == LENGTH:
            size, pos = _read_varint(buf, pos)
            if pos + size > len(buf):
                raise WireError("truncated length-delimited field")
            value, pos = bytes(buf[pos:pos + size]), pos + size
        elif wire_type in (FIXED64, FIXED32):
            width = 8 if wire_type == FIXED64 else 4
            if pos + width > len(buf):
                raise WireError("truncated fixed-width field")
            value, pos = bytes(buf[pos:pos + width]), pos + width
        else:
            raise WireError(f"unsupported wire type {wire_type}")
        fields.setdefault(number, []).append(value)
    return fields


# ---- typed reads of a parsed message -------------------------------------------------------------------
def last(fields: dict[int, list], number: int, default=None):
    """A singular field: proto3 keeps the last occurrence."""
    values = fields.get(number)
    return values[-1] if values else default


def as_str(value: bytes | None) -> str:
    if value is None:
        return ""
    if not isinstance(value, bytes):
        raise WireError("expected a string")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise WireError("string is not UTF-8") from None


def as_signed(value: int) -> int:
    """A varint as a signed 64-bit integer (negative int32/int64 values are sent as 10-byte varints)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def as_double(value: bytes) -> float:
    if not isinstance(value, bytes) or len(value) != 8:
        raise WireError("expected a double")
    return struct.unpack("<d", value)[0]


def repeated_ints(values: list) -> list[int]:
    """A repeated integer field, packed (one length-delimited run of varints) or not."""
    out: list[int] = []
    for value in values:
        if isinstance(value, int):
            out.append(as_signed(value))
            continue
        pos = 0
        while pos < len(value):
            item, pos = _read_varint(value, pos)
            out.append(as_signed(item))
    return out


def map_entries(values: list) -> list[tuple[bytes | None, object]]:
    """A map field's (key, value) pairs: each entry is a message with the key as field 1, the value as 2."""
    out = []
    for entry in values:
        if not isinstance(entry, bytes):
            raise WireError("expected a map entry")
        fields = parse(entry)
        out.append((last(fields, 1), last(fields, 2)))
    return out


# ---- writing ------------------------------------------------------------------------------------------
def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def varint_field(number: int, value: int) -> bytes:
    return _varint(number << 3 | VARINT) + _varint(int(value))


def bytes_field(number: int, value: bytes | str) -> bytes:
    data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    return _varint(number << 3 | LENGTH) + _varint(len(data)) + data


def double_field(number: int, value: float) -> bytes:
    return _varint(number << 3 | FIXED64) + struct.pack("<d", float(value))


def packed_ints_field(number: int, values: list[int]) -> bytes:
    return bytes_field(number, b"".join(_varint(int(v)) for v in values)) if values else b""


def map_field(number: int, entries: dict, write_value) -> bytes:
    """A map field: one entry message per item; `write_value(field_number, value)` encodes a value."""
    return b"".join(bytes_field(number, bytes_field(1, key) + write_value(2, value)) for key, value in entries.items())
