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
from dicom_factory import CT_IMAGE_STORAGE, ct_dataset, dataset_bytes_of_file, encode

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
