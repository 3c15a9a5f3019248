"""Receiver.store_instance: the status each kind of instance gets, and what ends up stored."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian, JPEGBaseline8Bit, MRImageStorage, generate_uid)

from appliance.ingest.receiver import Receiver
from appliance.ingest.status import StoreStatus
from appliance.store import Store
from appliance_dev.dicom_factory import CT_IMAGE_STORAGE, ct_dataset, dataset_bytes_of_file, encode

# pydicom warns while reading the deliberately broken datasets these tests send.
pytestmark = [pytest.mark.filterwarnings("ignore:Invalid value for VR UI"),
              pytest.mark.filterwarnings("ignore:The value length"),
              pytest.mark.filterwarnings("ignore:End of file reached"),
              pytest.mark.filterwarnings("ignore:Expected explicit VR")]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.open(tmp_path / "data")


@pytest.fixture
def receiver(store: Store) -> Receiver:
    return Receiver(store, min_free_bytes=0)


def new_ds(**kw: object):  # type: ignore[no-untyped-def]
    return ct_dataset(study_uid=generate_uid(), series_uid=generate_uid(), **kw)  # type: ignore[arg-type]


def send(receiver: Receiver, payload: bytes, sop_class: str, sop_instance: str,
         ts: str = ExplicitVRLittleEndian, calling_ae: str = "CT01", assoc: str | None = None):  # type: ignore[no-untyped-def]
    return receiver.store_instance(payload, ts, sop_class, sop_instance, calling_ae, assoc)


def stored_files(store: Store) -> list[Path]:
    return sorted(p for p in store.spool.root.rglob("*") if p.is_file())


def instance_count(store: Store) -> int:
    return store.index.conn.execute("SELECT COUNT(*) FROM instances").fetchone()[0]


def assert_nothing_stored(store: Store) -> None:
    assert stored_files(store) == [], "a refused instance left a file in the spool"
    assert instance_count(store) == 0, "a refused instance was indexed"
    assert store.index.list_series() == []


# -- success ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian,
                                DeflatedExplicitVRLittleEndian])
def test_success_stores_exact_bytes_and_indexes(receiver: Receiver, store: Store, ts: str) -> None:
    ds = new_ds(number=7)
    if ts == DeflatedExplicitVRLittleEndian:
        import zlib

        c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        payload = c.compress(encode(ds, ExplicitVRLittleEndian)) + c.flush()
    else:
        payload = encode(ds, ts)
    out = send(receiver, payload, CT_IMAGE_STORAGE, ds.SOPInstanceUID, ts, assoc="assoc-1")
    assert out.status == StoreStatus.SUCCESS
    assert not out.duplicate
    path = store.spool.root / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    assert stored_files(store) == [path]
    data = path.read_bytes()
    assert dataset_bytes_of_file(data) == payload
    back = dcmread(path)
    assert back.file_meta.TransferSyntaxUID == ts
    assert back.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert back.file_meta.MediaStorageSOPClassUID == CT_IMAGE_STORAGE
    assert back.file_meta.SourceApplicationEntityTitle == "CT01"
    assert back.SOPInstanceUID == ds.SOPInstanceUID
    assert back.PixelData == ds.PixelData
    rows = store.index.series_instances(ds.SeriesInstanceUID)
    assert len(rows) == 1
    row = rows[0]
    assert row["sop_instance_uid"] == ds.SOPInstanceUID
    assert row["transfer_syntax"] == ts
    assert row["association_id"] == "assoc-1"
    assert row["size"] == len(data)
    assert store.spool.root / row["path"] == path
    series = store.index.list_series()[0]
    assert (series["modality"], series["patient_id"], series["description"]) == ("CT", "TEST-0001", "test series")


def test_compressed_syntax_is_stored_as_received(receiver: Receiver, store: Store) -> None:
    """Pixels are never decoded at ingest: an encapsulated JPEG stream is stored byte for byte."""
    from pydicom.encaps import encapsulate

    ds = new_ds()
    ds.PixelData = encapsulate([b"\xff\xd8 not really a jpeg \xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    payload = encode(ds, ExplicitVRLittleEndian)
    out = send(receiver, payload, CT_IMAGE_STORAGE, ds.SOPInstanceUID, JPEGBaseline8Bit)
    assert out.status == StoreStatus.SUCCESS
    [path] = stored_files(store)
    assert dataset_bytes_of_file(path.read_bytes()) == payload


def test_duplicate_is_success_with_one_copy(receiver: Receiver, store: Store) -> None:
    ds = new_ds()
    payload = encode(ds)
    first = send(receiver, payload, CT_IMAGE_STORAGE, ds.SOPInstanceUID)
    again = send(receiver, payload, CT_IMAGE_STORAGE, ds.SOPInstanceUID)
    assert first.status == again.status == StoreStatus.SUCCESS
    assert not first.duplicate and again.duplicate
    assert len(stored_files(store)) == 1
    assert instance_count(store) == 1
    assert store.index.list_series()[0]["instances"] == 1
    assert store.index.counters()[("ingest_duplicate_instances", "")] == 1
    assert list(store.spool.incoming.iterdir()) == []


# -- re-sent instances: identical duplicates and conflicting copies ----------------------------------------


def _stored(store: Store, ds) -> Path:  # type: ignore[no-untyped-def]
    return store.spool.root / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"


def _complete(store: Store, series_uid: str) -> None:
    with store.index.transaction() as c:
        c.execute("UPDATE series SET state = 'done', state_changed = 1, state_reason = 'test' WHERE series_uid = ?",
                  (series_uid,))


def _changed(ds):  # type: ignore[no-untyped-def]
    """The same SOP Instance UID with other content (a corrected re-send)."""
    from copy import deepcopy

    other = deepcopy(ds)
    other.PixelData = bytes(len(ds.PixelData))
    other.SeriesDescription = "corrected"
    return other


def test_identical_resend_from_another_caller_is_a_plain_duplicate(receiver: Receiver, store: Store) -> None:
    """The file meta holds the calling AE title, so the stored file differs; the data set does not."""
    ds = new_ds()
    payload = encode(ds)
    assert send(receiver, payload, CT_IMAGE_STORAGE, ds.SOPInstanceUID, calling_ae="CT01").status == StoreStatus.SUCCESS
    _complete(store, ds.SeriesInstanceUID)
    before = _stored(store, ds).read_bytes()
    again = send(receiver, payload, CT_IMAGE_STORAGE, ds.SOPInstanceUID, calling_ae="A_LONGER_TITLE")
    assert again.status == StoreStatus.SUCCESS and again.duplicate
    assert _stored(store, ds).read_bytes() == before
    counters = store.index.counters()
    assert counters[("ingest_duplicate_instances", "")] == 1
    assert not [k for k in counters if k[0] == "ingest_conflicting_instances"]
    assert store.index.list_series()[0]["state"] == "done", "an identical re-send must not re-open the series"


def test_conflicting_resend_is_kept_counted_and_logged(receiver: Receiver, store: Store,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    ds = new_ds()
    store.index.open_association("a2", "CT02", "10.1.2.3:4100")
    assert send(receiver, encode(ds), CT_IMAGE_STORAGE, ds.SOPInstanceUID).status == StoreStatus.SUCCESS
    _complete(store, ds.SeriesInstanceUID)
    before = _stored(store, ds).read_bytes()
    with caplog.at_level("WARNING", logger="appliance.ingest"):
        out = send(receiver, encode(_changed(ds)), CT_IMAGE_STORAGE, ds.SOPInstanceUID, calling_ae="CT02",
                   assoc="a2")
    assert out.status == StoreStatus.SUCCESS and out.duplicate
    assert _stored(store, ds).read_bytes() == before, "keep: the stored copy must stay byte for byte"
    counters = store.index.counters()
    assert counters[("ingest_conflicting_instances", "kept")] == 1
    assert ("ingest_duplicate_instances", "") not in counters
    [rec] = [r for r in caplog.records if "different from the stored copy" in r.getMessage()]
    assert rec.levelname == "WARNING"
    assert "CT02" in rec.getMessage() and "10.1.2.3:4100" in rec.getMessage() and ds.SOPInstanceUID in rec.getMessage()
    series = store.index.list_series()[0]
    assert (series["state"], series["instances"], series["reopened"]) == ("done", 1, 0)
    assert list(store.spool.incoming.iterdir()) == []


def test_conflicting_resend_of_same_length_is_found(receiver: Receiver, store: Store) -> None:
    """Same length, one pixel different: the bytes are compared, not only the sizes."""
    ds = new_ds()
    assert send(receiver, encode(ds), CT_IMAGE_STORAGE, ds.SOPInstanceUID).status == StoreStatus.SUCCESS
    other = _changed(ds)
    other.SeriesDescription = ds.SeriesDescription
    pixels = bytearray(ds.PixelData)
    pixels[-1] ^= 0xFF
    other.PixelData = bytes(pixels)
    assert len(encode(other)) == len(encode(ds))
    send(receiver, encode(other), CT_IMAGE_STORAGE, ds.SOPInstanceUID)
    assert store.index.counters()[("ingest_conflicting_instances", "kept")] == 1


def test_conflicting_resend_replaces_and_reopens_the_series(store: Store) -> None:
    receiver = Receiver(store, min_free_bytes=0, on_duplicate="replace")
    ds = new_ds()
    assert send(receiver, encode(ds), CT_IMAGE_STORAGE, ds.SOPInstanceUID).status == StoreStatus.SUCCESS
    _complete(store, ds.SeriesInstanceUID)
    new = encode(_changed(ds), ImplicitVRLittleEndian)
    out = send(receiver, new, CT_IMAGE_STORAGE, ds.SOPInstanceUID, ts=ImplicitVRLittleEndian, calling_ae="CT02",
               assoc="a2")
    assert out.status == StoreStatus.SUCCESS and not out.duplicate
    path = _stored(store, ds)
    assert stored_files(store) == [path]
    data = path.read_bytes()
    assert dataset_bytes_of_file(data) == new
    assert dcmread(path).file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    [row] = store.index.series_instances(ds.SeriesInstanceUID)
    assert (row["size"], row["transfer_syntax"], row["association_id"]) == (len(data), ImplicitVRLittleEndian, "a2")
    series = store.index.list_series()[0]
    assert (series["state"], series["instances"], series["bytes"], series["reopened"]) == (
        "receiving", 1, len(data), 1)
    assert "replaced" in series["state_reason"]
    assert [e["to_state"] for e in store.index.series_events(ds.SeriesInstanceUID)][-1] == "receiving"
    assert store.index.counters()[("ingest_conflicting_instances", "replaced")] == 1
    assert list(store.spool.incoming.iterdir()) == []
    # The same new copy once more: now a plain duplicate, and nothing re-opens.
    _complete(store, ds.SeriesInstanceUID)
    again = send(receiver, new, CT_IMAGE_STORAGE, ds.SOPInstanceUID, ts=ImplicitVRLittleEndian)
    assert again.duplicate and store.index.list_series()[0]["state"] == "done"
    assert store.index.counters()[("ingest_duplicate_instances", "")] == 1


def test_replacement_moved_to_another_series_reopens_both(store: Store) -> None:
    receiver = Receiver(store, min_free_bytes=0, on_duplicate="replace")
    ds = new_ds()
    send(receiver, encode(ds), CT_IMAGE_STORAGE, ds.SOPInstanceUID)
    keep = new_ds()
    keep.StudyInstanceUID, keep.SeriesInstanceUID = ds.StudyInstanceUID, ds.SeriesInstanceUID
    send(receiver, encode(keep), CT_IMAGE_STORAGE, keep.SOPInstanceUID)
    _complete(store, ds.SeriesInstanceUID)
    moved = _changed(ds)
    moved.SeriesInstanceUID = generate_uid()
    assert send(receiver, encode(moved), CT_IMAGE_STORAGE, ds.SOPInstanceUID).status == StoreStatus.SUCCESS
    assert not _stored(store, ds).exists()
    assert _stored(store, moved).exists()
    by_uid = {s["series_uid"]: s for s in store.index.list_series()}
    assert by_uid[ds.SeriesInstanceUID]["instances"] == 1 and by_uid[ds.SeriesInstanceUID]["state"] == "receiving"
    assert by_uid[moved.SeriesInstanceUID]["instances"] == 1
    assert instance_count(store) == 2


def test_race_lost_to_a_different_copy_keeps_row_and_file_consistent(store: Store) -> None:
    """Two associations deliver different copies at once: ours is renamed over theirs, theirs indexes first."""
    receiver = Receiver(store, min_free_bytes=0)
    ds = new_ds()
    theirs = encode(ds)
    send(receiver, theirs, CT_IMAGE_STORAGE, ds.SOPInstanceUID)
    real = store.index.has_instance
    store.index.has_instance = lambda uid: False  # type: ignore[method-assign]  # both saw it missing
    try:
        ours = encode(_changed(ds))
        out = send(receiver, ours, CT_IMAGE_STORAGE, ds.SOPInstanceUID)
    finally:
        store.index.has_instance = real  # type: ignore[method-assign]
    assert out.status == StoreStatus.SUCCESS
    data = _stored(store, ds).read_bytes()
    assert dataset_bytes_of_file(data) == ours
    [row] = store.index.series_instances(ds.SeriesInstanceUID)
    assert row["size"] == len(data), "the row must describe the file on disk"
    assert store.index.counters()[("ingest_conflicting_instances", "replaced")] == 1


def test_receiver_refuses_unknown_duplicate_policy(store: Store) -> None:
    with pytest.raises(ValueError):
        Receiver(store, min_free_bytes=0, on_duplicate="merge")


# -- refusals ---------------------------------------------------------------------------------------------


def test_unparseable_deflate_stream_cannot_be_understood(receiver: Receiver, store: Store) -> None:
    out = send(receiver, b"\xff" * 200, CT_IMAGE_STORAGE, generate_uid(), DeflatedExplicitVRLittleEndian)
    assert out.status == StoreStatus.CANNOT_UNDERSTAND == 0xC000
    assert_nothing_stored(store)


def test_unterminated_sequence_cannot_be_understood(receiver: Receiver, store: Store) -> None:
    payload = encode(new_ds())[:0] + struct.pack("<HH2sHI", 0x0008, 0x1140, b"SQ", 0, 0xFFFFFFFF) + \
        b"\xfe\xff\x00\xe0" + struct.pack("<I", 0xFFFFFFFF)
    out = send(receiver, payload, CT_IMAGE_STORAGE, generate_uid())
    assert out.status == StoreStatus.CANNOT_UNDERSTAND
    assert_nothing_stored(store)


def test_truncated_dataset_cannot_be_understood(receiver: Receiver, store: Store) -> None:
    """A dataset cut inside its Pixel Data value (declared 512 bytes, 412 sent) is not an instance.

    Answering Success would tell the modality it may delete an image whose pixels were lost.
    """
    ds = new_ds()
    payload = encode(ds)
    assert len(ds.PixelData) == 512
    out = send(receiver, payload[:-100], CT_IMAGE_STORAGE, ds.SOPInstanceUID)
    assert out.status == StoreStatus.CANNOT_UNDERSTAND, (hex(out.status), out.detail)
    assert_nothing_stored(store)


@pytest.mark.parametrize("garbage", [
    b"\xff" * 256,
    b"This is not DICOM, it is a text file sent by mistake.\n" * 20,
    bytes(range(256)) * 8,
], ids=["ff-bytes", "text", "byte-ramp"])
def test_garbage_cannot_be_understood(receiver: Receiver, store: Store, garbage: bytes) -> None:
    out = send(receiver, garbage, CT_IMAGE_STORAGE, generate_uid(), ImplicitVRLittleEndian)
    assert out.status == StoreStatus.CANNOT_UNDERSTAND, (hex(out.status), out.detail)
    assert_nothing_stored(store)


def test_missing_sop_instance_uid(receiver: Receiver, store: Store) -> None:
    ds = new_ds()
    uid = ds.SOPInstanceUID
    del ds.SOPInstanceUID
    out = send(receiver, encode(ds), CT_IMAGE_STORAGE, uid)
    assert out.status == StoreStatus.MISSING_UID == 0xC001
    assert "SOP Instance UID" in out.detail
    assert_nothing_stored(store)


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID"])
def test_missing_other_uids(receiver: Receiver, store: Store, keyword: str) -> None:
    ds = new_ds()
    delattr(ds, keyword)
    out = send(receiver, encode(ds), CT_IMAGE_STORAGE, ds.SOPInstanceUID)
    assert out.status == StoreStatus.MISSING_UID
    assert_nothing_stored(store)


def test_empty_sop_instance_uid_is_missing(receiver: Receiver, store: Store) -> None:
    ds = new_ds()
    uid = ds.SOPInstanceUID
    ds.SOPInstanceUID = ""
    out = send(receiver, encode(ds), CT_IMAGE_STORAGE, uid)
    assert out.status == StoreStatus.MISSING_UID
    assert_nothing_stored(store)


@pytest.mark.parametrize("bad", ["1.2.3.abc/../../etc", "../../../tmp/x", "1.2." + "3" * 70, "1..2"])
def test_invalid_sop_instance_uid(receiver: Receiver, store: Store, tmp_path: Path, bad: str) -> None:
    ds = new_ds()
    ds.SOPInstanceUID = bad
    out = send(receiver, encode(ds), CT_IMAGE_STORAGE, bad)
    assert out.status == StoreStatus.INVALID_UID == 0xC002, (hex(out.status), out.detail)
    assert_nothing_stored(store)
    assert not (tmp_path / "etc").exists() and not (tmp_path / "data" / "etc").exists()


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID"])
def test_invalid_path_uids(receiver: Receiver, store: Store, keyword: str) -> None:
    ds = new_ds()
    setattr(ds, keyword, "..")
    out = send(receiver, encode(ds), CT_IMAGE_STORAGE, ds.SOPInstanceUID)
    assert out.status == StoreStatus.INVALID_UID
    assert_nothing_stored(store)


def test_sop_instance_uid_mismatch(receiver: Receiver, store: Store) -> None:
    ds = new_ds()
    out = send(receiver, encode(ds), CT_IMAGE_STORAGE, generate_uid())
    assert out.status == StoreStatus.INSTANCE_UID_MISMATCH == 0xC003
    assert_nothing_stored(store)


def test_sop_class_mismatch(receiver: Receiver, store: Store) -> None:
    ds = new_ds()
    out = send(receiver, encode(ds), str(MRImageStorage), ds.SOPInstanceUID)
    assert out.status == StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS == 0xA900
    assert_nothing_stored(store)


def test_disk_reserve_refuses_and_writes_nothing(store: Store) -> None:
    receiver = Receiver(store, min_free_bytes=10**18)
    ds = new_ds()
    out = send(receiver, encode(ds), CT_IMAGE_STORAGE, ds.SOPInstanceUID)
    assert out.status == StoreStatus.OUT_OF_RESOURCES == 0xA700
    assert_nothing_stored(store)
    assert list(store.spool.incoming.iterdir()) == []


def test_disk_reserve_counts_the_instance_size(store: Store) -> None:
    ds = new_ds()
    payload = encode(ds)
    free = store.spool.free_bytes()
    # Reserve set so the free space is enough now, but not once this instance is written.
    receiver = Receiver(store, min_free_bytes=free - len(payload) // 2)
    out = send(receiver, payload, CT_IMAGE_STORAGE, ds.SOPInstanceUID)
    assert out.status == StoreStatus.OUT_OF_RESOURCES
    assert_nothing_stored(store)


def test_shutting_down_refuses(receiver: Receiver, store: Store) -> None:
    receiver.stopping.set()
    ds = new_ds()
    out = send(receiver, encode(ds), CT_IMAGE_STORAGE, ds.SOPInstanceUID)
    assert out.status == StoreStatus.SHUTTING_DOWN
    assert (out.status >> 8) == 0xA7  # an Out of Resources code: senders retry
    assert_nothing_stored(store)


def test_refusals_are_counted(receiver: Receiver, store: Store) -> None:
    ds = new_ds()
    send(receiver, encode(ds), CT_IMAGE_STORAGE, generate_uid())
    send(receiver, encode(ds), CT_IMAGE_STORAGE, generate_uid())
    assert store.index.counters()[("ingest_rejected_instances", "instance_uid_mismatch")] == 2
