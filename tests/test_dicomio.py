"""Stored Deflated instances are read by the router and the worker without inflating them whole."""

from __future__ import annotations

import struct
import tracemalloc
import zlib
from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage, generate_uid

from appliance.dicomio import HeaderError, MAX_DECODED_BYTES, check_decodable, read_header
from appliance.errors import DecodeError
from appliance.infer.volume import _read, _read_header
from appliance.ingest.receiver import file_meta

DEFLATED = "1.2.840.10008.1.2.1.99"


def _elem(tag: tuple[int, int], vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"OW"):
        return struct.pack("<HH", *tag) + vr + b"\0\0" + struct.pack("<I", len(value)) + value
    return struct.pack("<HH", *tag) + vr + struct.pack("<H", len(value)) + value


def _ui(v: str) -> bytes:
    b = v.encode()
    return b + b"\0" if len(b) % 2 else b


def write_bomb(path: Path, pixel_bytes: int, rows: int) -> str:
    """A stored-format file (our file meta) with a Deflated data set whose pixels inflate to zeros."""
    sop = generate_uid()
    head = b"".join([_elem((0x0008, 0x0016), b"UI", _ui(CTImageStorage)), _elem((0x0008, 0x0018), b"UI", _ui(sop)),
                     _elem((0x0008, 0x0060), b"CS", b"CT"), _elem((0x0020, 0x000D), b"UI", _ui(generate_uid())),
                     _elem((0x0020, 0x000E), b"UI", _ui(generate_uid())),
                     _elem((0x0028, 0x0010), b"US", struct.pack("<H", rows)),
                     _elem((0x0028, 0x0011), b"US", struct.pack("<H", rows)),
                     _elem((0x0028, 0x0100), b"US", struct.pack("<H", 16))])
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [comp.compress(head + struct.pack("<HH", 0x7FE0, 0x0010) + b"OW\0\0" + struct.pack("<I", pixel_bytes))]
    zeros = bytes(4 * 1024 * 1024)
    for _ in range(pixel_bytes // len(zeros)):
        parts.append(comp.compress(zeros))
    parts.append(comp.flush())
    path.write_bytes(file_meta(CTImageStorage, sop, DEFLATED, "TEST") + b"".join(parts))
    return sop


def test_header_of_a_deflated_bomb_is_read_in_bounded_memory(tmp_path: Path) -> None:
    f = tmp_path / "bomb.dcm"
    sop = write_bomb(f, 512 * 1024 * 1024, rows=16384)
    tracemalloc.start()
    try:
        ds = read_header(f)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert ds.SOPInstanceUID == sop and ds.Modality == "CT" and "PixelData" not in ds
    assert peak < 8 * 1024 * 1024, f"reading the header held {peak / 1e6:.0f} MB"


def test_worker_refuses_a_slice_too_large_to_decode(tmp_path: Path) -> None:
    f = tmp_path / "bomb.dcm"
    write_bomb(f, 512 * 1024 * 1024, rows=16384)  # 16384^2 x 2 bytes = 512 MiB decoded
    with pytest.raises(DecodeError, match="would decode to 536870912 bytes"):
        _read_header(f)
    with pytest.raises(DecodeError, match="over the"):
        _read(f)
    with pytest.raises(HeaderError):
        check_decodable(read_header(f), "x")
    assert MAX_DECODED_BYTES < 512 * 1024 * 1024
