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


class ModelPackageError(ApplianceError):
    """A model package is missing, malformed, or its files do not match their checksums."""


class BackendUnavailable(ApplianceError):
    """An inference backend cannot run here (library not installed, no GPU); ``auto`` falls back."""


class EngineBuildError(ApplianceError):
    """An optimised engine could not be built from a model's ONNX file (the message says why)."""


class InferenceError(ApplianceError):
    """A series could not be run through a model; the job fails with this message as its reason."""


class DecodeError(InferenceError):
    """Pixel data could not be decoded (unsupported or damaged transfer syntax)."""


class GeometryError(InferenceError):
    """The slices of a series do not form one volume (mixed orientations, sizes, or missing positions)."""


class ResultsError(ApplianceError):
    """Model outputs could not be turned into DICOM result objects (SEG, SR, key image); the message says
    which object and what in the source series or model package prevents it."""
