"""The appliance's one configuration file: TOML, validated in full before anything starts.

A typo in a key must stop the start with a message naming it: a silently ignored
``allowed_callers`` would leave the box open to every modality on the network.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from appliance.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # JetPack 6 ships Python 3.10
    import tomli as tomllib

#: Looked up in the working directory when ``--config`` is not given.
DEFAULT_CONFIG_NAME = "appliance.toml"

_AE_TITLE_MAX = 16


def _check_ae_title(value: str) -> str:
    stripped = value.strip()
    if not stripped or len(value) > _AE_TITLE_MAX or "\\" in value or not value.isascii() or not value.isprintable():
        raise ValueError(
            f"{value!r} is not a valid AE title (1-{_AE_TITLE_MAX} printable ASCII characters, no backslash)"
        )
    return stripped


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AllowedCaller(_Section):
    """One modality or PACS that may open associations; ``host`` pins it to an address."""

    ae_title: str
    host: str | None = None

    _ae = field_validator("ae_title")(_check_ae_title)


class DicomConfig(_Section):
    ae_title: str = "EDGE"
    bind: str = "0.0.0.0"
    port: Annotated[int, Field(ge=1, le=65535)] = 11112
    max_associations: Annotated[int, Field(ge=1, le=1024)] = 16
    allowed_callers: list[AllowedCaller] = Field(default_factory=list)
    #: Listener processes accepting on the port. 0: one per CPU core, at least 4 (measured best on 2 cores).
    #: pynetdicom holds the GIL per process, so parallel associations need several processes.
    listeners: Annotated[int, Field(ge=0, le=64)] = 0
    #: Largest P-DATA PDU we accept; 0 = unlimited. Large PDUs mean fewer Python round trips per instance.
    max_pdu_size: Annotated[int, Field(ge=0)] = 0
    #: Seconds without network traffic before an association is aborted.
    network_timeout: Annotated[float, Field(gt=0)] = 60.0

    _ae = field_validator("ae_title")(_check_ae_title)

    def listener_count(self) -> int:
        if self.listeners:
            return self.listeners
        return max(4, os.cpu_count() or 1)


class StorageConfig(_Section):
    data_dir: Path = Path("./var")
    #: Below this many free bytes on the data filesystem, new instances are refused with 0xA700.
    min_free_bytes: Annotated[int, Field(ge=0)] = 2_000_000_000


class AssembleConfig(_Section):
    #: Idle seconds after which a series counts as complete.
    stable_seconds: Annotated[float, Field(gt=0)] = 5.0
    #: Seconds after the delivering association(s) released before the series counts as complete.
    release_grace_seconds: Annotated[float, Field(ge=0)] = 1.0
    #: How often the assembler looks at the store; bounds the completion latency.
    poll_seconds: Annotated[float, Field(gt=0, le=5)] = 0.2


class LoggingConfig(_Section):
    level: str = "INFO"

    @field_validator("level")
    @classmethod
    def _level(cls, value: str) -> str:
        up = value.upper()
        if up not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR")
        return up


class Config(_Section):
    dicom: DicomConfig = Field(default_factory=DicomConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    assemble: AssembleConfig = Field(default_factory=AssembleConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    #: Where the file came from (None: embedded defaults); relative data_dir resolves against the cwd.
    source: Path | None = Field(default=None, exclude=True)


def _describe(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (check the spelling; see README for the allowed keys)")
        else:
            got = e.get("input")
            shown = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
            lines.append(f"  {key}: {e['msg']}{shown}")
    return "\n".join(lines)


def parse_config(data: dict[str, Any], source: str = "<embedded defaults>") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err, source)) from None


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Load and validate the config; ``None`` uses ./appliance.toml if present, else embedded defaults."""
    if path is None:
        candidate = Path(DEFAULT_CONFIG_NAME)
        if not candidate.exists():
            return Config()
        path = candidate
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {p}: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"configuration file {p} is not valid TOML: {exc}") from None
    cfg = parse_config(data, str(p))
    return cfg.model_copy(update={"source": p})
