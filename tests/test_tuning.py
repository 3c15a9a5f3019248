"""The speed-ups in ingest must not change a byte on the wire or on disk."""

from __future__ import annotations

import copy
from io import BytesIO

import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE

from appliance import IMPLEMENTATION_VERSION_NAME
from appliance.config import Config
from appliance.ingest.receiver import IMPLEMENTATION_CLASS_UID, file_meta
from appliance.ingest.scp import ACCEPTED_TRANSFER_SYNTAXES, Ingest, _ContextList
from appliance.ingest.tuning import encode_store_success


@pytest.mark.parametrize(
    ("sop_class", "sop_instance", "message_id"),
    [
        ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", 1),               # even-length UIDs
        ("1.2.840.10008.5.1.4.1.1.20", "1.2.826.0.1.3680043.8.498.12345", 65535),  # odd lengths, max ID
    ],
)
def test_store_success_response_matches_pynetdicom(sop_class: str, sop_instance: str, message_id: int) -> None:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = message_id
    primitive.AffectedSOPClassUID = sop_class
    primitive.AffectedSOPInstanceUID = sop_instance
    primitive.Status = 0x0000
    msg = C_STORE_RSP()
    msg.primitive_to_message(primitive)
    pdvs = [pdv for pdata in msg.encode_msg(1, 16382) for pdv in pdata.presentation_data_value_list]
    assert [pdv[1][0] for pdv in pdvs] == [0x03]  # one command fragment, the last
    assert pdvs[0][1][1:] == encode_store_success(sop_class, sop_instance, message_id)


@pytest.mark.parametrize("calling_ae", ["STORESCU", "ODD", "", "  PADDED  "])
def test_file_meta_matches_pydicom(calling_ae: str) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.2")
    meta.MediaStorageSOPInstanceUID = UID("1.2.3.45")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    if calling_ae.strip():
        meta.SourceApplicationEntityTitle = calling_ae.strip()
    expected = BytesIO()
    expected.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(expected, meta, enforce_standard=True)
    got = file_meta("1.2.840.10008.5.1.4.1.1.2", "1.2.3.45", ExplicitVRLittleEndian, calling_ae)
    assert got == expected.getvalue()


def test_context_copy_is_private_and_equal() -> None:
    ae = Ingest(Config(), receiver=None).make_ae()  # type: ignore[arg-type]
    contexts = _ContextList(ae.supported_contexts)
    dup = copy.deepcopy(contexts)
    assert len(dup) == len(contexts) > 100
    for a, b in zip(contexts, dup):
        assert a is not b
        assert a.abstract_syntax == b.abstract_syntax
        assert a.transfer_syntax == b.transfer_syntax
        assert a.transfer_syntax is not b.transfer_syntax  # mutating one association's copy leaves the server's alone
    dup[0].transfer_syntax.append("1.2.3")
    assert "1.2.3" not in contexts[0].transfer_syntax


def test_explicit_vr_little_endian_is_preferred() -> None:
    assert ACCEPTED_TRANSFER_SYNTAXES[0] == ExplicitVRLittleEndian
    assert len(set(ACCEPTED_TRANSFER_SYNTAXES)) == len(ACCEPTED_TRANSFER_SYNTAXES)
