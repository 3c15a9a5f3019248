"""Every DICOM test file that ships in pydicom and pydicom-data, sent to the running appliance.

Real files from many vendors and every transfer syntax, plus the damaged ones those projects keep
for their own tests (truncated, no meta, wrong VR, bad sequences) and a few files that are not
DICOM at all. Each file is sent on its own association, proposing its own SOP class and transfer
syntax. Well-formed files go through pynetdicom's file-based C-STORE, which sends the bytes after
the file meta as they are; files pynetdicom will not send (no meta, no SOP UIDs) go through a raw
C-STORE with the same bytes. Every file must end in a definite outcome that the test predicts
independently (``dicom_structure`` for well-formedness, the UID rules of the architecture), and
every instance answered Success must be on disk byte for byte.
"""

from __future__ import annotations

import re
import warnings
import zlib
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset, read_preamble
from pydicom.uid import (AllTransferSyntaxes, CTImageStorage, ExplicitVRBigEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian, UID, generate_uid)
from pynetdicom import AllStoragePresentationContexts, _config
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from appliance.ingest.status import StoreStatus
from conftest import CALLED_AE, Appliance, pynetdicom_ae, raw_c_store
from appliance_dev.dicom_factory import dataset_bytes_of_file
from dicom_structure import Malformed, check_dataset

pytestmark = pytest.mark.slow

STORAGE_CLASSES = {str(cx.abstract_syntax) for cx in AllStoragePresentationContexts}
TRANSFER_SYNTAXES = {str(ts) for ts in AllTransferSyntaxes}
UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")
HEADER_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
SUCCESS = 0x0000


def corpus_roots() -> dict[str, Path]:
    roots = {"pydicom": Path(pydicom.__file__).parent / "data" / "test_files"}
    try:
        import data_store  # the pydicom-data wheel

        roots["pydicom-data"] = Path(data_store.__file__).parent / "data"
    except ImportError:
        pytest.fail("pydicom-data is not installed (it is a test dependency: pip install -e '.[test]')")
    return roots


def corpus_files() -> list[tuple[str, Path]]:
    files = []
    for label, root in corpus_roots().items():
        assert root.is_dir(), root
        for p in sorted(root.rglob("*")):
            if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".py", ".pyc"):
                files.append((f"{label}/{p.relative_to(root)}", p))
    return files


@dataclass
class Sent:
    name: str
    path: Path
    method: str  # "send_c_store" (pynetdicom, from the file) or "raw"
    sop_class: str
    sop_instance: str
    transfer_syntax: str
    payload: bytes
    outcome: str = ""  # "status", "context-rejected", "no-response", "error: ..."
    status: int | None = None
    expected: set[int] | str = field(default_factory=set)
    why: str = ""


def split_part10(path: Path) -> tuple[Dataset, int]:
    """File meta and the offset of the dataset; tolerates files without preamble or meta."""
    with open(path, "rb") as fp:
        try:
            read_preamble(fp, True)
            start = fp.tell()
            meta = read_dataset(fp, is_implicit_VR=False, is_little_endian=True,
                                stop_when=lambda tag, vr, length: tag.group != 2)
            return meta, fp.tell()
        except Exception:
            return Dataset(), start if "start" in locals() else 0


def _text(value: Any) -> str:
    return "" if value is None else str(value).rstrip("\x00 ")


def plan(name: str, path: Path) -> Sent:
    raw = path.read_bytes()
    meta, offset = split_part10(path)
    payload = raw[offset:]
    ts = _text(meta.get("TransferSyntaxUID"))
    try:
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
    except Exception:
        ds = None
    if not ts:
        # No transfer syntax in the file: send it in the encoding pydicom recognises, else implicit.
        enc = ds.original_encoding if ds is not None else (None, None)
        ts = {(True, True): ImplicitVRLittleEndian, (False, True): ExplicitVRLittleEndian,
              (False, False): ExplicitVRBigEndian}.get(enc, ImplicitVRLittleEndian)
    meta_class = _text(meta.get("MediaStorageSOPClassUID"))
    meta_inst = _text(meta.get("MediaStorageSOPInstanceUID"))
    if meta_class and meta_inst and _text(meta.get("TransferSyntaxUID")):
        return Sent(name, path, "send_c_store", meta_class, meta_inst, ts, payload)
    ds_class = _text(ds.get("SOPClassUID")) if ds is not None else ""
    ds_inst = _text(ds.get("SOPInstanceUID")) if ds is not None else ""
    sop_class = meta_class or (ds_class if 0 < len(ds_class) <= 64 else "") or str(CTImageStorage)
    sop_inst = meta_inst or (ds_inst if 0 < len(ds_inst) <= 64 else "") or generate_uid()
    return Sent(name, path, "raw", sop_class, sop_inst, ts, payload)


def predict(s: Sent) -> tuple[set[int] | str, str]:
    """What the appliance must answer, decided without the appliance's code."""
    if s.sop_class not in STORAGE_CLASSES:
        return "context-rejected", "not a storage SOP class"
    if s.transfer_syntax not in TRANSFER_SYNTAXES:
        return "context-rejected", "unknown transfer syntax"
    try:
        check_dataset(s.payload, s.transfer_syntax)
    except Malformed as exc:
        return {StoreStatus.CANNOT_UNDERSTAND}, f"malformed: {exc}"
    ts = UID(s.transfer_syntax)
    data = s.payload
    if ts.is_deflated:
        data = zlib.decompress(data, -zlib.MAX_WBITS)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = read_dataset(BytesIO(data), ts.is_implicit_VR, ts.is_little_endian)
            values = {kw: _text(ds.get(kw)) for kw in HEADER_UIDS}
    except Exception as exc:
        return {StoreStatus.CANNOT_UNDERSTAND}, f"pydicom cannot read it: {exc}"
    missing = [kw for kw, v in values.items() if not v]
    invalid = [kw for kw, v in values.items() if v and (len(v) > 64 or not UID_RE.fullmatch(v))]
    if missing or invalid:
        codes = set()
        if missing:
            codes.add(StoreStatus.MISSING_UID)
        if invalid:
            codes.add(StoreStatus.INVALID_UID)
        return codes, f"missing {missing}, invalid {invalid}"
    codes = set()
    if values["SOPInstanceUID"] != s.sop_instance:
        codes.add(StoreStatus.INSTANCE_UID_MISMATCH)
    if values["SOPClassUID"] != s.sop_class:
        codes.add(StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS)
    if codes:
        return codes, "request and dataset UIDs differ"
    return {SUCCESS}, "well-formed"


def send_one(app: Appliance, s: Sent) -> None:
    ae = pynetdicom_ae("CORPUS")
    ae.add_requested_context(Verification)
    ae.add_requested_context(s.sop_class, s.transfer_syntax)
    assoc = ae.associate("127.0.0.1", app.port, ae_title=CALLED_AE)
    if not assoc.is_established:
        s.outcome = "error: association not established"
        return
    try:
        accepted = [cx for cx in assoc.accepted_contexts
                    if cx.abstract_syntax == s.sop_class and cx.transfer_syntax[0] == s.transfer_syntax]
        if not accepted:
            s.outcome = "context-rejected"
            return
        if s.method == "send_c_store":
            rsp = assoc.send_c_store(s.path)
            s.status = int(rsp.Status) if "Status" in rsp else None
        else:
            s.status = raw_c_store(assoc, s.payload, s.sop_class, s.sop_instance, s.transfer_syntax)
        s.outcome = "status" if s.status is not None else "no-response"
    except Exception as exc:  # recorded, and asserted below
        s.outcome = f"error: {type(exc).__name__}: {exc}"
    finally:
        if assoc.is_established:
            assoc.release()


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory: pytest.TempPathFactory) -> Any:
    app = Appliance(tmp_path_factory.mktemp("corpus") / "appliance").start()
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's own bytes, do not re-encode
    sent: list[Sent] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name, path in corpus_files():
                s = plan(name, path)
                s.expected, s.why = predict(s)
                send_one(app, s)
                sent.append(s)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
    yield app, sent
    if app.running:
        rc = app.terminate()
        assert rc == 0, f"exit code {rc} after SIGTERM\n{app.log_tail()}"


def _report(rows: list[Sent]) -> str:
    return "\n".join(
        f"  {s.name}: {s.outcome} {'' if s.status is None else hex(s.status)}; expected "
        f"{s.expected if isinstance(s.expected, str) else sorted(hex(c) for c in s.expected)} ({s.why})"
        for s in rows)


def test_corpus_is_there(corpus_run: Any) -> None:
    _, sent = corpus_run
    names = {s.name for s in sent}
    assert len(sent) >= 200, f"only {len(sent)} corpus files found"
    assert "pydicom/CT_small.dcm" in names and "pydicom-data/emri_small_RLE.dcm" in names
    # The corpus exercises every branch of the test, or the test proves less than it says.
    assert sum(s.method == "raw" for s in sent) >= 5
    assert sum(s.expected == {SUCCESS} for s in sent) >= 150
    assert sum(s.expected == "context-rejected" for s in sent) >= 1
    assert sum(s.expected == {StoreStatus.CANNOT_UNDERSTAND} for s in sent) >= 3


def test_corpus_every_file_has_a_definite_outcome(corpus_run: Any) -> None:
    app, sent = corpus_run
    print("outcomes:\n" + _report(sent))
    known = {int(c) for c in StoreStatus} - {StoreStatus.STORAGE_FAILURE, StoreStatus.SHUTTING_DOWN,
                                              StoreStatus.OUT_OF_RESOURCES}
    bad = [s for s in sent if s.outcome not in ("status", "context-rejected")
           or (s.outcome == "status" and s.status not in known)]
    assert not bad, "files without a definite, meaningful outcome:\n" + _report(bad)
    assert app.running, "the appliance died during the corpus run:\n" + app.log_tail()


def test_corpus_statuses_are_the_predicted_ones(corpus_run: Any) -> None:
    _, sent = corpus_run
    wrong = []
    for s in sent:
        if isinstance(s.expected, str):
            if s.outcome != s.expected:
                wrong.append(s)
        elif s.outcome != "status" or s.status not in s.expected:
            wrong.append(s)
    assert not wrong, f"{len(wrong)} of {len(sent)} files got another outcome than predicted:\n" + _report(wrong)


def test_corpus_successes_are_stored_byte_for_byte(corpus_run: Any) -> None:
    app, sent = corpus_run
    first: dict[str, Sent] = {}
    for s in sent:
        if s.status == SUCCESS:
            first.setdefault(s.sop_instance, s)
    assert first, "nothing was stored"
    problems = []
    for sop, s in first.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            meta, _ = split_part10(s.path)
            ts = UID(s.transfer_syntax)
            data = zlib.decompress(s.payload, -zlib.MAX_WBITS) if ts.is_deflated else s.payload
            ds = read_dataset(BytesIO(data), ts.is_implicit_VR, ts.is_little_endian)
        study, series = _text(ds.get("StudyInstanceUID")), _text(ds.get("SeriesInstanceUID"))
        path = app.spool / study / series / f"{sop}.dcm"
        if not path.exists():
            problems.append(f"{s.name}: answered Success but {path} does not exist")
            continue
        stored = path.read_bytes()
        if dataset_bytes_of_file(stored) != s.payload:
            problems.append(f"{s.name}: stored dataset bytes differ from the {len(s.payload)} bytes sent")
            continue
        back = pydicom.dcmread(path, stop_before_pixels=True)
        if back.file_meta.TransferSyntaxUID != s.transfer_syntax:
            problems.append(f"{s.name}: stored with transfer syntax {back.file_meta.TransferSyntaxUID}, "
                            f"received in {s.transfer_syntax}")
        if back.file_meta.MediaStorageSOPInstanceUID != sop:
            problems.append(f"{s.name}: file meta names instance {back.file_meta.MediaStorageSOPInstanceUID}")
    assert not problems, "\n".join(problems)


def test_corpus_index_matches_spool(corpus_run: Any) -> None:
    app, sent = corpus_run
    succeeded = {s.sop_instance for s in sent if s.status == SUCCESS}
    rows = app.query("SELECT sop_instance_uid, path, size FROM instances")
    assert {r["sop_instance_uid"] for r in rows} == succeeded
    assert len(rows) == len(succeeded)
    files = app.spool_files()
    assert sorted(app.spool / r["path"] for r in rows) == files
    for r in rows:
        assert (app.spool / r["path"]).stat().st_size == r["size"]
    assert app.partials() == []
    series = app.series()
    assert sum(s["instances"] for s in series) == len(succeeded)
