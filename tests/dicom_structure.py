"""An independent check that an encoded dataset is structurally whole.

pydicom's reader is lenient: a value shorter than its declared length, or a sequence whose
delimiter never comes, is read without an error. The tests need to know, without trusting the
code under test, whether a dataset as sent is complete: this walks the element stream of the
transfer syntax (explicit/implicit VR, either byte order, deflate) and checks every declared
length fits and every undefined-length sequence or item is closed.
"""

from __future__ import annotations

import struct
import zlib

from pydicom.uid import UID

#: Explicit VR with a 2-byte reserved field and a 4-byte length.
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
SHORT_VRS = {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"PN", b"SH",
             b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}
UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_END, SEQ_END = (0xFFFE, 0xE000), (0xFFFE, 0xE00D), (0xFFFE, 0xE0DD)


class Malformed(ValueError):
    """The byte stream is not a complete dataset in the transfer syntax."""


def check_dataset(payload: bytes, transfer_syntax: str) -> None:
    """Raise :class:`Malformed` unless ``payload`` is a whole dataset in ``transfer_syntax``."""
    ts = UID(transfer_syntax)
    data = payload
    if ts.is_deflated:
        try:
            d = zlib.decompressobj(-zlib.MAX_WBITS)
            data = d.decompress(payload) + d.flush()
        except zlib.error as exc:
            raise Malformed(f"deflated dataset does not inflate: {exc}") from None
        if not d.eof:
            raise Malformed("deflate stream is incomplete")
    explicit = not ts.is_implicit_VR
    little = ts.is_little_endian
    end = _dataset(data, 0, len(data), explicit, little, in_item=False)
    if end != len(data):
        raise Malformed(f"trailing bytes at {end}")


def _u16(b: bytes, pos: int, little: bool) -> int:
    return struct.unpack_from("<H" if little else ">H", b, pos)[0]


def _u32(b: bytes, pos: int, little: bool) -> int:
    return struct.unpack_from("<I" if little else ">I", b, pos)[0]


def _dataset(b: bytes, pos: int, end: int, explicit: bool, little: bool, in_item: bool) -> int:
    """Walk elements from ``pos``; in an undefined-length item, up to and including its delimiter."""
    while pos < end:
        if pos + 8 > end:
            raise Malformed(f"element header cut at {pos}")
        tag = (_u16(b, pos, little), _u16(b, pos + 2, little))
        if tag == ITEM_END:
            if not in_item:
                raise Malformed(f"item delimiter outside an item at {pos}")
            return pos + 8
        if tag[0] == 0xFFFE:
            raise Malformed(f"unexpected ({tag[0]:04X},{tag[1]:04X}) at {pos}")
        vr = None
        if explicit:
            vr = b[pos + 4:pos + 6]
            if vr in LONG_VRS:
                if pos + 12 > end:
                    raise Malformed(f"element header cut at {pos}")
                length = _u32(b, pos + 8, little)
                pos += 12
            elif vr in SHORT_VRS:
                length = _u16(b, pos + 6, little)
                pos += 8
            else:
                raise Malformed(f"unknown VR {vr!r} for ({tag[0]:04X},{tag[1]:04X}) at {pos}")
        else:
            length = _u32(b, pos + 4, little)
            pos += 8
        if length == UNDEFINED:
            # A sequence, or encapsulated pixel data; UN of undefined length is implicit VR LE inside.
            inner_explicit = explicit and vr != b"UN"
            inner_little = little if vr != b"UN" else True
            pos = _items(b, pos, end, inner_explicit, inner_little)
        else:
            if pos + length > end:
                raise Malformed(
                    f"({tag[0]:04X},{tag[1]:04X}) declares {length} bytes, only {end - pos} remain")
            pos += length
    if in_item:
        raise Malformed("undefined-length item not closed")
    return pos


def _items(b: bytes, pos: int, end: int, explicit: bool, little: bool) -> int:
    while True:
        if pos + 8 > end:
            raise Malformed("sequence not closed by a delimiter")
        tag = (_u16(b, pos, little), _u16(b, pos + 2, little))
        length = _u32(b, pos + 4, little)
        pos += 8
        if tag == SEQ_END:
            return pos
        if tag != ITEM:
            raise Malformed(f"expected an item, found ({tag[0]:04X},{tag[1]:04X})")
        if length == UNDEFINED:
            pos = _dataset(b, pos, end, explicit, little, in_item=True)
        else:
            if pos + length > end:
                raise Malformed(f"item declares {length} bytes, only {end - pos} remain")
            pos += length
