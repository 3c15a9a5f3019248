"""Start-up recovery: instances a crash left on disk between the rename and the index commit.

Such a file is complete (it was flushed before the rename) but was never acknowledged, and no
index row points at it. Indexing it keeps the scan; leaving it would hide it from every later
stage (and from retention). Only series directories whose file count differs from the index's
are listed file by file, so a normal start costs one directory listing per series.
"""

from __future__ import annotations

import logging
import os

from pydicom.filereader import read_file_meta_info

from appliance.errors import ApplianceError
from appliance.ingest.receiver import checked_uids, instance_record, parse_header
from appliance.store import Store
from appliance.store.spool import INCOMING_DIR

log = logging.getLogger("appliance.ingest")

_PREAMBLE_AND_MAGIC = 132


def index_orphans(store: Store) -> int:
    """Index every complete spool file that has no index row; returns how many were recovered."""
    counts = store.index.series_instance_counts()
    recovered = 0
    with os.scandir(store.spool.root) as studies:
        for study in studies:
            if not study.is_dir() or study.name == INCOMING_DIR:
                continue
            with os.scandir(study.path) as series_dirs:
                for series in series_dirs:
                    if not series.is_dir():
                        continue
                    names = [n for n in os.listdir(series.path) if n.endswith(".dcm")]
                    if len(names) == counts.get(series.name, 0):
                        continue
                    known = store.index.instance_uids(series.name)
                    for name in names:
                        if name[:-4] not in known:
                            recovered += _index_file(store, study.name, series.name, name)
    if recovered:
        log.warning("recovered %d instance(s) written before a crash but not yet indexed", recovered)
    return recovered


def _index_file(store: Store, study_uid: str, series_uid: str, name: str) -> int:
    relpath = f"{study_uid}/{series_uid}/{name}"
    path = store.spool.root / relpath
    try:
        meta = read_file_meta_info(path)
        with open(path, "rb") as f:
            raw = f.read()
        start = _PREAMBLE_AND_MAGIC + 12 + int(meta.FileMetaInformationGroupLength)
        values = parse_header(raw[start:], meta.TransferSyntaxUID)
        uids = checked_uids(values)
        if (uids.sop_instance, uids.series, uids.study) != (name[:-4], series_uid, study_uid):
            raise ApplianceError("its UIDs do not match its place in the spool")
        rec = instance_record(values, uids, str(meta.TransferSyntaxUID), relpath, len(raw))
        return 1 if store.index.add_instance_idempotent(rec, None) else 0
    except Exception as exc:  # a file we cannot vouch for stays where it is, for a person to look at
        log.error("spool file %s has no index row and cannot be recovered (%s); left in place", path, exc)
        return 0
