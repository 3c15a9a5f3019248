"""Reading the header of a stored instance without trusting its size claims.

Instances are stored exactly as received, Deflated ones included. pydicom inflates a Deflated file
whole before parsing it, even with ``stop_before_pixels``: a 1 MB file that inflates to 1 GiB of
pixel data took 2.2 GB in the router that only wanted its Modality. Here only as much is inflated as
the header needs (bounded), and a decoded frame's size is checked against a bound before anything
decodes it.
"""

from __future__ import annotations

import zlib
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble  # noqa: PLC2701
from pydicom.tag import BaseTag
from pydicom.uid import UID

#: Inflated bytes a header may take (everything before the pixel data); real headers are kilobytes.
MAX_HEADER_BYTES = 16 * 1024 * 1024
_STEP = 256 * 1024
_PIXEL_TAGS = {0x7FE00008, 0x7FE00009, 0x7FE00010}


class HeaderError(ValueError):
    """The stored file's header cannot be read within its bounds."""


def _at_pixels(tag: BaseTag, vr: object, length: object) -> bool:
    return int(tag) in _PIXEL_TAGS


def read_header(path: str | Path) -> Dataset:
    """The data set up to (not including) its pixel data, with its file meta; bounded for Deflated files."""
    with open(path, "rb") as fp:
        read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
        ts = UID(str(meta.get("TransferSyntaxUID", "")))
        if not ts.is_deflated:
            fp.seek(0)
            return pydicom.dcmread(fp, stop_before_pixels=True)
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        out = bytearray()
        while len(out) < MAX_HEADER_BYTES:
            chunk = inflater.unconsumed_tail or fp.read(_STEP)
            if not chunk:
                break
            out += inflater.decompress(chunk, _STEP)
            if inflater.eof:
                break
            if b"\xe0\x7f\x10\x00" in out[-_STEP - 4 :]:  # the pixel data element's tag has been inflated
                break
    try:
        ds = read_dataset(BytesIO(bytes(out)), False, True, stop_when=_at_pixels)
    except Exception as exc:
        raise HeaderError(
            f"{Path(path).name}: the Deflated header cannot be read within {MAX_HEADER_BYTES} inflated bytes: {exc}"
        ) from None
    ds.file_meta = meta
    return ds


def frame_bytes(ds: Dataset) -> int:
    """Bytes the decoded pixel data will take, from the header (0 if it says nothing)."""
    try:
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.get("BitsAllocated", 16) or 16)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return 0
    return rows * cols * samples * max(1, (bits + 7) // 8) * max(1, frames)


#: Largest decoded pixel data of one stored file the worker will decode (a 512x512 CT slice is 0.5 MB,
#: a 4096x4096 mammogram 32 MB): a header claiming more is refused before anything is allocated.
MAX_DECODED_BYTES = 256 * 1024 * 1024


def is_deflated(path: str | Path) -> bool:
    with open(path, "rb") as fp:
        read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
    return UID(str(meta.get("TransferSyntaxUID", ""))).is_deflated


def check_decodable(ds: Dataset, where: str) -> None:
    """Raise :class:`HeaderError` if decoding ``ds``'s pixel data would take more than the bound."""
    need = frame_bytes(ds)
    if need > MAX_DECODED_BYTES:
        raise HeaderError(
            f"{where}: its pixel data would decode to {need} bytes "
            f"(Rows x Columns x samples x frames), over the {MAX_DECODED_BYTES}-byte bound"
        )


#: DICOM Modality (0008,0060) defined terms (PS3.3 C.7.3.1.1.1) that a metric label may carry; any other
#: value a sender writes is counted as "other", so a stranger cannot grow the label set.
MODALITIES = frozenset(
    {
        "AR",
        "AS",
        "ASMT",
        "AU",
        "BDUS",
        "BI",
        "BMD",
        "CR",
        "CT",
        "CTPROTOCOL",
        "DG",
        "DOC",
        "DX",
        "ECG",
        "EPS",
        "ES",
        "FID",
        "GM",
        "HC",
        "HD",
        "IO",
        "IOL",
        "IVOCT",
        "IVUS",
        "KER",
        "KO",
        "LEN",
        "LS",
        "MG",
        "MR",
        "M3D",
        "NM",
        "OAM",
        "OCT",
        "OP",
        "OPM",
        "OPT",
        "OPTBSV",
        "OPTENF",
        "OPV",
        "OSS",
        "OT",
        "PLAN",
        "PR",
        "PT",
        "PX",
        "REG",
        "RESP",
        "RF",
        "RG",
        "RTDOSE",
        "RTIMAGE",
        "RTINTENT",
        "RTPLAN",
        "RTRAD",
        "RTRECORD",
        "RTSEGANN",
        "RTSTRUCT",
        "RWV",
        "SEG",
        "SM",
        "SMR",
        "SR",
        "SRF",
        "STAIN",
        "TEXTUREMAP",
        "TG",
        "US",
        "VA",
        "XA",
        "XAPROTOCOL",
        "XC",
    }
)


def modality_label(value: object) -> str:
    """``value`` if it is a defined Modality term, else ``"other"`` (``"none"`` when absent)."""
    if value is None or value == "":
        return "none"
    text = str(value).strip().upper()
    return text if text in MODALITIES else "other"
