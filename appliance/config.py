"""The appliance's one configuration file: TOML, validated in full before anything starts.

A typo in a key must stop the start with a message naming it: a silently ignored
``allowed_callers`` would leave the box open to every modality on the network.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from appliance.errors import ConfigError
from appliance.validation import TOMLDecodeError, loads_toml, problems

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
    #: Largest P-DATA-TF PDU we advertise and accept (bytes). A longer one is a protocol violation and
    #: aborts the association. Finite: every listener may hold max_associations of these in memory.
    max_pdu_size: Annotated[int, Field(ge=4096, le=64 * 1024 * 1024)] = 1_048_576
    #: Largest association-phase PDU (A-ASSOCIATE-RQ, A-RELEASE, A-ABORT) we read; longer ones are aborted.
    #: Real senders' largest proposals (128 presentation contexts) are far below this.
    max_association_pdu: Annotated[int, Field(ge=8192, le=16 * 1024 * 1024)] = 262_144
    #: Seconds without network traffic before an association is aborted.
    network_timeout: Annotated[float, Field(gt=0)] = 60.0
    #: Seconds a connection may take to complete A-ASSOCIATE (request and our answer) before it is dropped.
    acse_timeout: Annotated[float, Field(gt=0, le=600)] = 30.0
    #: Largest received dataset (bytes) held in memory; a larger one is spilled to a temporary file on
    #: the data filesystem while it arrives, so memory never follows an instance's size.
    memory_instance_bytes: Annotated[int, Field(ge=1_048_576)] = 32 * 1024 * 1024
    #: Largest dataset (bytes) accepted at all, and the bound on what a Deflated dataset may inflate to.
    max_instance_bytes: Annotated[int, Field(ge=1_048_576)] = 4 * 1024**3

    _ae = field_validator("ae_title")(_check_ae_title)

    def listener_count(self) -> int:
        if self.listeners:
            return self.listeners
        return max(4, os.cpu_count() or 1)


class StorageConfig(_Section):
    data_dir: Path = Path("./var")
    #: Below this many free bytes on the data filesystem, new instances are refused with 0xA700.
    min_free_bytes: Annotated[int, Field(ge=0)] = 2_000_000_000
    #: Days a series (its instances and results) is kept after all its results were delivered (or after
    #: it was found to need no model); then it is purged. Undelivered work is never purged. 0 keeps all.
    retention_days: Annotated[float, Field(ge=0)] = 30.0
    #: A re-sent instance whose SOP Instance UID is stored but whose content differs: "keep" the stored
    #: copy (counted and logged as a conflict) or "replace" it (the series is re-opened and processed again).
    on_duplicate: Literal["keep", "replace"] = "keep"


class AssembleConfig(_Section):
    #: Idle seconds after which a series counts as complete.
    stable_seconds: Annotated[float, Field(gt=0)] = 5.0
    #: Seconds after the delivering association(s) released before the series counts as complete.
    release_grace_seconds: Annotated[float, Field(ge=0)] = 0.5
    #: How often the assembler looks at the store; bounds the completion latency.
    poll_seconds: Annotated[float, Field(gt=0, le=5)] = 0.1


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class DeviceConfig(_Section):
    """What this box is called in a fleet: shown on ``appliance_build_info`` (one series), not on every metric;
    a fleet's Prometheus adds them as target labels (see the fleet kit's scrape example)."""

    id: str = ""
    site: str = ""

    @field_validator("id", "site")
    @classmethod
    def _name(cls, value: str) -> str:
        if value and not _NAME_RE.match(value):
            raise ValueError(f"{value!r}: use 1-64 letters, digits, '.', '_' or '-' (a metric label value)")
        return value


class MetricsConfig(_Section):
    """``/metrics``, ``/healthz`` and ``/readyz`` over HTTP, for Prometheus and load balancers."""

    enabled: bool = True
    #: Loopback by default: a fleet scrapes through a reverse proxy or sets the box's address here.
    bind: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 9464


class PanelConfig(_Section):
    """The technician panel (web pages and ``/api/v1``): login required; accounts come from
    ``appliance users add``, none ships."""

    enabled: bool = True
    #: Loopback by default: set the box's clinic-network address (or "0.0.0.0"), ideally behind a TLS proxy.
    bind: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8080
    #: Worker threads of the WSGI server (waitress).
    threads: Annotated[int, Field(ge=1, le=64)] = 8
    #: A session unused this long must log in again.
    idle_minutes: Annotated[float, Field(gt=0, le=24 * 60)] = 30.0
    #: Failed logins that lock an account name, and an address, within ``lockout_window_seconds``.
    lockout_account_failures: Annotated[int, Field(ge=1, le=1000)] = 10
    lockout_address_failures: Annotated[int, Field(ge=1, le=10000)] = 20
    lockout_window_seconds: Annotated[float, Field(gt=0)] = 900.0
    #: How long a lockout lasts unless an admin lifts it first (users page, or ``appliance users unlock``).
    lockout_seconds: Annotated[float, Field(gt=0)] = 900.0
    #: Behind a reverse proxy that terminates TLS (and sets X-Forwarded-Proto/-For): cookies become
    #: ``Secure`` and the client address comes from the proxy's header.
    behind_tls_proxy: bool = False
    #: Language for users who chose none and browsers that ask for none of en, vi, ko.
    default_language: Literal["en", "vi", "ko"] = "en"


class LoggingConfig(_Section):
    level: str = "INFO"

    @field_validator("level")
    @classmethod
    def _level(cls, value: str) -> str:
        up = value.upper()
        if up not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR")
        return up


class InferenceConfig(_Section):
    #: auto: TensorRT where it imports and a GPU answers, otherwise ONNX Runtime on the CPU.
    backend: Literal["auto", "onnxruntime", "tensorrt"] = "auto"
    precision: Literal["fp16", "fp32"] = "fp16"
    #: Where model packages live; default: the models/ folder shipped with the appliance.
    models_dir: Path | None = None
    #: CPU threads for ONNX Runtime; 0 = one per core.
    threads: Annotated[int, Field(ge=0, le=256)] = 0
    #: A job whose worker dies this many times (crash, kill, out of memory) is marked failed.
    max_attempts: Annotated[int, Field(ge=1, le=20)] = 3
    #: CPU priority of the worker (nice increment): ingest keeps the CPU while a model runs.
    nice: Annotated[int, Field(ge=0, le=19)] = 10
    #: How often the router and the worker look at the store for new work.
    poll_seconds: Annotated[float, Field(gt=0, le=5)] = 0.1
    #: Peak memory the worker may use for one series (MB): the series is processed in slabs along z so
    #: that this bound, not the series length, sets the peak. Default fits an 8 GB Jetson running the rest.
    memory_budget_mb: Annotated[int, Field(ge=256, le=65536)] = 1024

    def resolved_models_dir(self) -> Path:
        from appliance.models.package import bundled_models_dir

        return self.models_dir if self.models_dir is not None else bundled_models_dir()


class ExportConfig(_Section):
    """How results are sent to destinations: retries with exponential backoff and jitter, then a dead letter."""

    #: Attempts per object and destination before it is marked dead (``appliance outbox retry`` revives it).
    max_attempts: Annotated[int, Field(ge=1, le=1000)] = 100
    #: Delay before the first retry; doubled on each further failure (with jitter), up to backoff_max_seconds.
    backoff_seconds: Annotated[float, Field(gt=0)] = 5.0
    backoff_max_seconds: Annotated[float, Field(gt=0)] = 300.0
    #: Connection, association and C-STORE response timeout.
    timeout_seconds: Annotated[float, Field(gt=0, le=600)] = 30.0
    #: How often the sender looks at the outbox.
    poll_seconds: Annotated[float, Field(gt=0, le=10)] = 0.2
    #: Objects sent per association.
    batch: Annotated[int, Field(ge=1, le=10000)] = 100


class Destination(_Section):
    """A DICOM peer (PACS, viewer) that results are sent to."""

    name: Annotated[str, Field(min_length=1, max_length=64)]
    ae_title: str
    host: Annotated[str, Field(min_length=1)]
    port: Annotated[int, Field(ge=1, le=65535)]

    _ae = field_validator("ae_title")(_check_ae_title)


MatchValue = str | list[str | float]


class Route(_Section):
    """Which models run on which series: every match condition must hold (see README, Routing)."""

    name: Annotated[str, Field(min_length=1, max_length=64)]
    match: dict[str, MatchValue] = Field(default_factory=dict)
    models: Annotated[list[str], Field(min_length=1)]
    destinations: list[str] = Field(default_factory=list)
    #: Higher runs first (a STAT rule for the emergency CT gets a higher number).
    priority: int = 0

    @field_validator("match")
    @classmethod
    def _match(cls, value: dict[str, MatchValue]) -> dict[str, MatchValue]:
        from pydicom.datadict import keyword_dict

        for key, cond in value.items():
            if key not in keyword_dict:
                raise ValueError(f"{key!r} is not a DICOM keyword (e.g. Modality, BodyPartExamined)")
            if isinstance(cond, str):
                try:
                    re.compile(cond)
                except re.error as exc:
                    raise ValueError(f"{key}: {cond!r} is not a valid regular expression: {exc}") from None
            elif all(isinstance(v, str) for v in cond):
                if not cond:
                    raise ValueError(f"{key}: an empty list matches nothing")
            elif len(cond) == 2 and all(isinstance(v, (int, float)) for v in cond):
                lo, hi = float(cond[0]), float(cond[1])
                if lo > hi:
                    raise ValueError(f"{key}: range [{cond[0]}, {cond[1]}] has min > max")
            else:
                raise ValueError(
                    f"{key}: use a regex string, a list of strings (with '!' exclusions) or a numeric [min, max]"
                )
        return value


#: The embedded default: contrast CT of the abdomen goes to the bundled demo model.
DEFAULT_ROUTES: tuple[Route, ...] = ()


class Config(_Section):
    dicom: DicomConfig = Field(default_factory=DicomConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    assemble: AssembleConfig = Field(default_factory=AssembleConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    destinations: list[Destination] = Field(default_factory=list)
    routes: list[Route] = Field(default_factory=lambda: list(DEFAULT_ROUTES))
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    panel: PanelConfig = Field(default_factory=PanelConfig)
    device: DeviceConfig = Field(default_factory=DeviceConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @model_validator(mode="after")
    def _references(self) -> Config:
        names = [d.name for d in self.destinations]
        if len(set(names)) != len(names):
            raise ValueError("destinations: each name may appear once")
        routes = [r.name for r in self.routes]
        if len(set(routes)) != len(routes):
            raise ValueError("routes: each name may appear once")
        for r in self.routes:
            for d in r.destinations:
                if d not in names:
                    raise ValueError(f"routes.{r.name}: destination {d!r} is not defined in [[destinations]]")
        return self

    #: Where the file came from (None: embedded defaults); relative data_dir resolves against the cwd.
    source: Path | None = Field(default=None, exclude=True)


def _describe(err: ValidationError, source: str) -> str:
    return "\n".join([f"invalid configuration in {source}:", *(f"  {p}" for p in problems(err, show_input=True))])


def parse_config(data: dict[str, Any], source: str = "<embedded defaults>") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err, source)) from None


#: The configuration file an installed box's commands use when ``--config`` is not given: set once (the
#: systemd unit and an admin's shell), so ``appliance series`` run by hand reads the service's data, not an
#: empty ``./var`` of the directory it happens to be run in.
CONFIG_ENV = "APPLIANCE_CONFIG"


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Load and validate the config; ``None`` uses ``$APPLIANCE_CONFIG`` when set, else ./appliance.toml if
    present, else embedded defaults."""
    via = ""
    if path is None and os.environ.get(CONFIG_ENV):
        path, via = os.environ[CONFIG_ENV], f" (from ${CONFIG_ENV})"
    if path is None:
        candidate = Path(DEFAULT_CONFIG_NAME)
        if not candidate.exists():
            return Config()
        path = candidate
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {p}{via}: {exc.strerror}") from None
    try:
        data = loads_toml(raw.decode("utf-8"))
    except (TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"configuration file {p} is not valid TOML: {exc}") from None
    cfg = parse_config(data, str(p))
    return cfg.model_copy(update={"source": p})


DEFAULT_ROUTES = (
    # Exclusions only, so a CT without BodyPartExamined (common) still reaches the model.
    Route(
        name="liver-ct",
        match={
            "Modality": "CT",
            "BodyPartExamined": ["!HEAD", "!BRAIN", "!NECK", "!SKULL", "!EXTREMITY", "!KNEE", "!HAND", "!FOOT"],
        },
        models=["liver-ct-demo"],
    ),
)
