"""Exception types whose messages a technician can act on."""


class ApplianceError(Exception):
    """Base class: anything the appliance reports to an operator rather than crashing on."""


class ConfigError(ApplianceError):
    """The configuration file is missing, unreadable or invalid; the message names the key."""


class StoreError(ApplianceError):
    """The durable store (spool directory or SQLite index) cannot be used."""


class InvalidUIDError(ApplianceError):
    """A DICOM UID is not digits and dots of at most 64 characters, so it must not become a path."""


class MissingUIDError(InvalidUIDError):
    """A UID the appliance needs (SOP Instance, Series, Study, SOP Class) is absent or empty."""
