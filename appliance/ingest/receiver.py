"""What happens to one received instance: check it, write it durably, index it, then answer.

Kept free of pynetdicom's event objects so it can be tested and profiled on its own; ``scp.py``
adapts pynetdicom's C-STORE event to :meth:`Receiver.store`.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from io import BytesIO

from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID

from appliance import IMPLEMENTATION_VERSION_NAME
from appliance.errors import InvalidUIDError, StoreError
from appliance.ingest.status import StoreStatus
from appliance.store import DiskFullError, InstanceRecord, Store, check_uid

log = logging.getLogger("appliance.ingest")

#: Our implementation class UID (2.25 form: a UUID-derived root needs no registration).
IMPLEMENTATION_CLASS_UID = "2.25.147839217442103914553826917716049210111"

_HEADER_TAGS = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "PatientID",
    "SeriesDescription",
)


@dataclass(frozen=True)
class Outcome:
    status: StoreStatus
    detail: str = ""
    duplicate: bool = False


class Receiver:
    """Stores instances into a :class:`Store`, enforcing the disk reserve and UID rules."""

    def __init__(self, store: Store, min_free_bytes: int) -> None:
        self.store = store
        self.min_free_bytes = min_free_bytes
        self.stopping = threading.Event()

    def store_instance(
        self,
        dataset: bytes | memoryview,
        transfer_syntax: str,
        affected_sop_class_uid: str,
        affected_sop_instance_uid: str,
        calling_ae: str,
        association_id: str | None,
    ) -> Outcome:
        """Make ``dataset`` (encoded as received, without file meta) durable and indexed."""
        if self.stopping.is_set():
            return self._refuse(StoreStatus.SHUTTING_DOWN, "appliance is shutting down; resend later", calling_ae)
        try:
            meta = _file_meta(affected_sop_class_uid, affected_sop_instance_uid, transfer_syntax, calling_ae)
        except (ValueError, TypeError) as exc:
            return self._refuse(StoreStatus.CANNOT_UNDERSTAND, f"cannot build file meta: {exc}", calling_ae)
        header_and_data = (meta, dataset)
        try:
            ds = dcmread(BytesIO(meta + bytes(dataset)), stop_before_pixels=False)
            values = {k: ds.get(k) for k in _HEADER_TAGS}
        except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OverflowError, NotImplementedError,
                AttributeError, IndexError, LookupError) as exc:
            return self._refuse(StoreStatus.CANNOT_UNDERSTAND, f"dataset cannot be parsed: {exc}", calling_ae)
        except Exception as exc:  # pydicom raises a wide range of types on corrupt input
            return self._refuse(StoreStatus.CANNOT_UNDERSTAND,
                                f"dataset cannot be parsed: {type(exc).__name__}: {exc}", calling_ae)
        try:
            sop_class = check_uid(values["SOPClassUID"], "SOP Class UID")
            sop_uid = check_uid(values["SOPInstanceUID"], "SOP Instance UID")
            study_uid = check_uid(values["StudyInstanceUID"], "Study Instance UID")
            series_uid = check_uid(values["SeriesInstanceUID"], "Series Instance UID")
        except InvalidUIDError as exc:
            status = StoreStatus.MISSING_UID if "missing" in str(exc) else StoreStatus.INVALID_UID
            return self._refuse(status, str(exc), calling_ae)
        if sop_uid != str(affected_sop_instance_uid).rstrip("\x00 "):
            return self._refuse(
                StoreStatus.INSTANCE_UID_MISMATCH,
                f"dataset SOP Instance UID {sop_uid} differs from the request's {affected_sop_instance_uid}",
                calling_ae,
            )
        if sop_class != str(affected_sop_class_uid).rstrip("\x00 "):
            return self._refuse(
                StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                f"dataset SOP Class UID {sop_class} differs from the request's {affected_sop_class_uid}",
                calling_ae,
            )

        index = self.store.index
        try:
            if index.has_instance(sop_uid):
                index.count("ingest_duplicate_instances")
                log.debug("duplicate instance %s from %s: already stored, answered Success", sop_uid, calling_ae)
                return Outcome(StoreStatus.SUCCESS, "duplicate", duplicate=True)
            size = len(meta) + len(dataset)
            free = self.store.spool.free_bytes()
            if free - size < self.min_free_bytes:
                return self._refuse(
                    StoreStatus.OUT_OF_RESOURCES,
                    f"only {free} bytes free on the data filesystem, reserve is {self.min_free_bytes}",
                    calling_ae,
                )
            path = self.store.spool.instance_path(study_uid, series_uid, sop_uid)
            self.store.spool.write(path, header_and_data)
            rec = InstanceRecord(
                sop_instance_uid=sop_uid, sop_class_uid=sop_class, study_uid=study_uid, series_uid=series_uid,
                transfer_syntax=str(transfer_syntax), path=str(path.relative_to(self.store.spool.root)),
                size=size, patient_id=_text(values["PatientID"]), modality=_text(values["Modality"]),
                description=_text(values["SeriesDescription"]),
            )
            if not index.add_instance_idempotent(rec, association_id):
                index.count("ingest_duplicate_instances")
                return Outcome(StoreStatus.SUCCESS, "duplicate", duplicate=True)
        except DiskFullError as exc:
            return self._refuse(StoreStatus.OUT_OF_RESOURCES, str(exc), calling_ae)
        except (StoreError, OSError) as exc:
            log.exception("storing %s failed", sop_uid)
            return self._refuse(StoreStatus.STORAGE_FAILURE, f"cannot store instance: {exc}", calling_ae)
        except Exception as exc:  # sqlite3 errors and anything unforeseen: never answer Success
            log.exception("storing %s failed", sop_uid)
            return self._refuse(StoreStatus.STORAGE_FAILURE, f"cannot index instance: {exc}", calling_ae)
        return Outcome(StoreStatus.SUCCESS)

    def _refuse(self, status: StoreStatus, detail: str, calling_ae: str) -> Outcome:
        log.warning("C-STORE from %s refused with 0x%04X (%s): %s", calling_ae, status, status.name, detail)
        try:
            self.store.index.count("ingest_rejected_instances", status.name.lower())
        except Exception:  # counting must never turn a refusal into a crash
            log.exception("could not count a rejected instance")
        return Outcome(status, detail)


def _text(value: object) -> str | None:
    if value is None:
        return None
    s = str(value).strip()
    return s or None


def _file_meta(sop_class: str, sop_instance: str, transfer_syntax: str, calling_ae: str) -> bytes:
    """Preamble, 'DICM' and the File Meta Information group for a received dataset."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(str(sop_class).rstrip("\x00 "))
    meta.MediaStorageSOPInstanceUID = UID(str(sop_instance).rstrip("\x00 "))
    meta.TransferSyntaxUID = UID(str(transfer_syntax))
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    if calling_ae:
        meta.SourceApplicationEntityTitle = calling_ae.strip()[:16]
    buf = BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    return buf.getvalue()
