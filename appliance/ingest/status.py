"""DICOM status codes the receiver answers with (PS3.4 Annex B.2.3, PS3.7 Annex C).

0xCxxx ("Cannot understand") codes are ours to define within the range; each has one cause so a
technician reading a modality's log can tell what was wrong.
"""

from enum import IntEnum


class StoreStatus(IntEnum):
    SUCCESS = 0x0000
    #: Below the disk reserve or the disk is full: retry later (the sender keeps the study).
    OUT_OF_RESOURCES = 0xA700
    #: The dataset's SOP Class UID is not the one the C-STORE request named.
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    #: The dataset cannot be parsed as DICOM in the negotiated transfer syntax.
    CANNOT_UNDERSTAND = 0xC000
    #: SOP Instance, Series or Study Instance UID (or SOP Class UID) is absent.
    MISSING_UID = 0xC001
    #: A UID is not digits and dots of at most 64 characters.
    INVALID_UID = 0xC002
    #: The dataset's SOP Instance UID differs from the request's Affected SOP Instance UID.
    INSTANCE_UID_MISMATCH = 0xC003
    #: The appliance is shutting down; the sender should retry.
    SHUTTING_DOWN = 0xA701
    #: The instance could not be written or indexed (I/O or database error); details in the log.
    STORAGE_FAILURE = 0xC210


#: A-ASSOCIATE-RJ parameters (PS3.8 Section 9.3.4): (result, source, reason).
REJECT_CALLING_AE_NOT_RECOGNIZED = (0x01, 0x01, 0x03)
REJECT_LOCAL_LIMIT_EXCEEDED = (0x02, 0x03, 0x02)
REJECT_TEMPORARY_CONGESTION = (0x02, 0x03, 0x01)
