"""One series' model output -> the result files the export stage sends and the panel shows.

Writes into the job's output directory (next to ``labelmap.npz`` and ``summary.json``): ``seg.dcm``,
``sr.dcm`` (measurements referencing that SEG), ``sc-1.dcm`` (key image), ``key.png``, ``thumb.png`` and,
last, ``objects.json`` listing the DICOM objects. Every file is written atomically and the directory is
fsynced, so after a crash ``objects.json`` either is absent (build again) or names objects that are all
complete on disk: export can trust it.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from pydicom.dataset import Dataset

from appliance.errors import ResultsError
from appliance.fsio import fsync_dir, write_atomic
from appliance.infer.pipeline import SeriesResult
from appliance.models.package import ModelPackage
from appliance.results.keyimage import make_sc, render_key_image
from appliance.results.preview import write_previews
from appliance.results.seg import make_seg, source_headers
from appliance.results.sr import make_sr

log = logging.getLogger("appliance.results")

SEG_FILE = "seg.dcm"
SR_FILE = "sr.dcm"
SC_FILE = "sc-1.dcm"
OBJECTS_FILE = "objects.json"


@dataclass(frozen=True)
class ResultObject:
    """One DICOM result object on disk: what export sends and the store indexes."""

    kind: Literal["SEG", "SR", "SC"]
    filename: str  # relative to the output directory
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str


def dicom_bytes(ds: Dataset) -> bytes:
    """``ds`` as a DICOM Part 10 file (preamble, file meta, dataset in its transfer syntax)."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _write(out_dir: Path, filename: str, kind: Literal["SEG", "SR", "SC"], ds: Dataset) -> ResultObject:
    """``ds`` written as ``filename`` atomically (as ``write_atomic``: temporary file, fsync, rename), encoded
    straight into the file: a thin-slice SEG is ~100 MB, which an in-memory copy (or two) would double."""
    path = out_dir / filename
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{filename}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                ds.save_as(f, enforce_file_format=True)
            except (ValueError, TypeError, AttributeError) as exc:
                raise ResultsError(f"cannot encode the {kind} as a DICOM file: {exc}") from exc
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return ResultObject(
        kind=kind,
        filename=filename,
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
    )


def build_results(result: SeriesResult, package: ModelPackage, out_dir: Path) -> list[ResultObject]:
    """Make the SEG, SR and key-image SC of ``result``, write them and the previews into ``out_dir``."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ResultsError(f"cannot create the result directory {out_dir}: {exc}") from exc
    volume, labels, measured = result.volume, result.labels, result.summary.measurements
    timings: dict[str, float] = {}

    t = time.perf_counter()
    sources = source_headers(volume)  # made once: SEG and SR reference the same slices
    seg = make_seg(volume, labels, package, sources)
    timings["seg"] = time.perf_counter() - t
    t = time.perf_counter()
    sr = make_sr(volume, measured, seg, package, sources)
    timings["sr"] = time.perf_counter() - t
    t = time.perf_counter()
    key = render_key_image(volume, labels, package, measured)
    sc = make_sc(volume, labels, key, package)
    timings["sc"] = time.perf_counter() - t

    t = time.perf_counter()
    try:
        # A rebuild first withdraws the old listing, so it never names files that are being replaced.
        listing_path = out_dir / OBJECTS_FILE
        if listing_path.exists():
            listing_path.unlink()
            fsync_dir(out_dir)
        objects = [
            _write(out_dir, SEG_FILE, "SEG", seg),
            _write(out_dir, SR_FILE, "SR", sr),
            _write(out_dir, SC_FILE, "SC", sc),
        ]
        write_previews(key.rgb, out_dir)
        # Last: its presence says every object it lists is complete.
        listing = json.dumps([asdict(o) for o in objects], indent=2) + "\n"
        write_atomic(listing_path, listing.encode("utf-8"))
        fsync_dir(out_dir)
    except OSError as exc:
        raise ResultsError(f"cannot write the results into {out_dir}: {exc} (disk full or read-only?)") from exc
    timings["write"] = time.perf_counter() - t
    log.info(
        "series %s: results %s (%s)",
        volume.series_uid,
        ", ".join(o.filename for o in objects),
        ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()),
    )
    return objects
