"""Who made a result object: the equipment attributes and numbering every result carries.

A PACS user must be able to tell an appliance result from a scanner image at a glance (series numbers far
above a scanner's, our manufacturer and software version), and a service engineer must be able to tell
which box and which release produced it (serial number, software version).
"""

from __future__ import annotations

import socket
from typing import Any

from pydicom.uid import generate_uid

from appliance import __version__

MANUFACTURER = "Clinic Edge Appliance"
MANUFACTURER_MODEL_NAME = "edge-appliance"
SOFTWARE_VERSION = __version__

#: Series numbers of the result series: above what scanners use, so they sort after the source series.
SEG_SERIES_NUMBER = 9001
SR_SERIES_NUMBER = 9002
SC_SERIES_NUMBER = 9003

#: DICOM LO (DeviceSerialNumber, names) holds at most 64 characters.
_LO_MAX = 64


def lo(text: str) -> str:
    """``text`` cut to a Long String's 64 characters (DICOM refuses longer values)."""
    return text[:_LO_MAX]


def device_serial() -> str:
    """The box's serial number as DICOM reports it: its host name, which the firmware sets per device."""
    return lo(socket.gethostname() or "unknown")


def device_uid() -> str:
    """A UID that stays the same for this device (derived from its serial), for the SR's device observer."""
    return generate_uid(entropy_srcs=[MANUFACTURER, MANUFACTURER_MODEL_NAME, device_serial()])


def new_object(series_number: int) -> dict[str, Any]:
    """The keyword arguments every highdicom result constructor takes for a new object from this device.

    One place for them, so SEG, SR and SC can never disagree on who made them.
    """
    return dict(
        series_instance_uid=new_uid(),
        series_number=series_number,
        sop_instance_uid=new_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MANUFACTURER_MODEL_NAME,
        software_versions=SOFTWARE_VERSION,
        device_serial_number=device_serial(),
    )


def new_uid() -> str:
    """A fresh, globally unique UID for a new series, instance or tracking identifier."""
    return generate_uid()
