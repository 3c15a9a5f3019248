#!/usr/bin/env python3
"""Is this box's platform one the appliance's GPU path supports? A verdict a technician can act on.

Run it with the appliance's own interpreter (``/opt/edge-appliance/venv/bin/python
firmware/check_platform.py``): whether TensorRT imports depends on that interpreter (a venv made without
``--system-site-packages`` does not see JetPack's bindings), and the point is to learn what the appliance
will see. It compares ``/etc/nv_tegra_release`` (the Jetson Linux release) and the installed TensorRT and
pycuda with ``firmware/platform.toml``, and exits:

- 0: supported, the TensorRT backend can run here;
- 1: not supported (not a Jetson, a release that is too old or not validated, TensorRT or pycuda missing):
  the appliance still runs, on ONNX Runtime on the CPU;
- 2: cannot tell (the release file is unreadable or not a release file, platform.toml is invalid) or a
  usage error.

The release file is treated as hostile input, like everything else the appliance reads: it is read only
if it is a regular file, at most :data:`MAX_RELEASE_BYTES`, and its first line must match the format
NVIDIA writes exactly; anything else is reported as such, never guessed at. Nothing here imports a GPU
library at module level, so the checker runs (and says what is missing) on any machine.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from appliance.validation import TOMLDecodeError, loads_toml, problems  # the configuration's reader and wording


DEFAULT_RELEASE_FILE = Path("/etc/nv_tegra_release")
DEFAULT_PLATFORM_FILE = Path(__file__).resolve().with_name("platform.toml")

#: Real release files are one header line plus, on older releases, a checksum list: a few KB at most.
MAX_RELEASE_BYTES = 64 * 1024
#: The header line NVIDIA writes is ~120 characters.
MAX_HEADER_CHARS = 512
#: Output of ``nvpmodel -q`` kept (a few lines in reality).
MAX_NVPMODEL_BYTES = 4096
NVPMODEL_TIMEOUT = 5.0

EXIT_SUPPORTED, EXIT_UNSUPPORTED, EXIT_CANNOT_TELL = 0, 1, 2

# "# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic, EABI: aarch64, DATE: Mon May  6 17:34:21 UTC 2024"
_HEADER = re.compile(r"# R(?P<major>[0-9]{1,4}) \((?P<kind>[a-z]{1,16})\), (?P<fields>.+)")
_FIELD = re.compile(r"(?P<key>[A-Z][A-Z_]{0,31}): (?P<value>[ -+\--~]{1,128})")  # printable ASCII but ","
_REVISION = re.compile(r"(?P<minor>[0-9]{1,4})\.(?P<patch>[0-9]{1,4})(?:\.(?P<extra>[0-9]{1,4}))?")
_KNOWN_FIELDS = {"REVISION", "GCID", "BOARD", "EABI", "DATE"}
_VERSION = re.compile(r"(?P<major>[0-9]{1,4})\.(?P<minor>[0-9]{1,4})")
_POWER_MODE = re.compile(r"NV Power Mode: ?(?P<mode>[A-Za-z0-9_]{1,64})")


class ReleaseFileError(Exception):
    """The release file exists but cannot be trusted; the message says why, for the technician."""


class PlatformFileError(Exception):
    """platform.toml is missing or malformed: a packaging error, not a property of the box."""


# -- the release file ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class L4TRelease:
    """The first line of ``/etc/nv_tegra_release``: which Jetson Linux (L4T) release is installed."""

    major: int
    minor: int
    patch: int
    kind: str
    board: str | None = None
    eabi: str | None = None
    gcid: str | None = None
    date: str | None = None

    @property
    def version(self) -> tuple[int, int, int]:
        return (self.major, self.minor, self.patch)

    @property
    def text(self) -> str:
        return f"R{self.major}.{self.minor}.{self.patch}"


def read_release_file(path: Path) -> bytes | None:
    """The file's bytes, or None when there is no such file (not a Jetson).

    Opened non-blocking and checked to be a regular file before anything is read, so a FIFO, a device
    (``/dev/zero``) or a directory put in its place cannot hang or flood the checker; at most
    :data:`MAX_RELEASE_BYTES` are read whatever the file claims its size is.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ReleaseFileError(f"{path}: cannot open: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ReleaseFileError(f"{path}: not a regular file")
        if st.st_size > MAX_RELEASE_BYTES:
            raise ReleaseFileError(
                f"{path}: {st.st_size} bytes, a release file is under {MAX_RELEASE_BYTES // 1024} KiB: not a release file"
            )
        chunks: list[bytes] = []
        total = 0
        while total <= MAX_RELEASE_BYTES:
            chunk = os.read(fd, MAX_RELEASE_BYTES + 1 - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > MAX_RELEASE_BYTES:  # it grew while being read, or its size was not its size
            raise ReleaseFileError(f"{path}: more than {MAX_RELEASE_BYTES // 1024} KiB: not a release file")
        return b"".join(chunks)
    except OSError as exc:
        raise ReleaseFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def parse_release(data: bytes, where: str = "release file") -> L4TRelease:
    """Parse the header line strictly; :class:`ReleaseFileError` naming what is wrong otherwise.

    Only the first line is interpreted (older releases follow it with a checksum list); the whole file
    must still be ASCII text, as every real one is.
    """
    if not data:
        raise ReleaseFileError(f"{where}: empty")
    if b"\0" in data:
        raise ReleaseFileError(f"{where}: contains NUL bytes: not a text file")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as exc:
        raise ReleaseFileError(f"{where}: not ASCII text (byte {exc.start})") from None
    header = text.split("\n", 1)[0]
    if len(header) > MAX_HEADER_CHARS:
        raise ReleaseFileError(f"{where}: first line is {len(header)} characters, not a release header")
    m = _HEADER.fullmatch(header)
    if m is None:
        raise ReleaseFileError(
            f"{where}: first line is not an L4T release header (expected '# R<n> (release), REVISION: <x.y>, ...'),"
            f" got {_shown(header)}"
        )
    fields: dict[str, str] = {}
    for part in m.group("fields").split(", "):
        f = _FIELD.fullmatch(part)
        if f is None:
            raise ReleaseFileError(f"{where}: malformed field {_shown(part)} in the release header")
        key = f.group("key")
        if key in fields:
            raise ReleaseFileError(f"{where}: field {key} appears twice in the release header")
        if key in _KNOWN_FIELDS and f.group("value") != f.group("value").strip():
            raise ReleaseFileError(f"{where}: field {key} has surrounding spaces")
        fields[key] = f.group("value")
    if "REVISION" not in fields:
        raise ReleaseFileError(f"{where}: the release header has no REVISION")
    r = _REVISION.fullmatch(fields["REVISION"])
    if r is None:
        raise ReleaseFileError(f"{where}: REVISION {_shown(fields['REVISION'])} is not <number>.<number>")
    return L4TRelease(
        major=int(m.group("major")),
        minor=int(r.group("minor")),
        patch=int(r.group("patch")),
        kind=m.group("kind"),
        board=fields.get("BOARD"),
        eabi=fields.get("EABI"),
        gcid=fields.get("GCID"),
        date=fields.get("DATE"),
    )


def _shown(text: str, limit: int = 80) -> str:
    """Untrusted text as it may appear in a message: repr (no control characters reach the terminal), cut."""
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


# -- platform.toml -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReleaseLine:
    """One ``[[l4t]]`` table of platform.toml."""

    release: str
    prefix: tuple[int, ...]
    jetpack: str
    tensorrt: str
    cuda: str
    ubuntu: str
    python: str
    status: str
    reason: str

    def matches(self, rel: L4TRelease) -> bool:
        return rel.version[: len(self.prefix)] == self.prefix


@dataclass(frozen=True)
class Platform:
    tensorrt_major_min: int
    tensorrt_module: str
    tensorrt_required_api: tuple[str, ...]
    python_min: tuple[int, int]
    power_modes: tuple[str, ...]
    power_note: str
    releases: tuple[ReleaseLine, ...]

    def match(self, rel: L4TRelease) -> ReleaseLine | None:
        """The most specific release line that covers ``rel`` (None: a release platform.toml does not know)."""
        hits = [r for r in self.releases if r.matches(rel)]
        return max(hits, key=lambda r: len(r.prefix)) if hits else None

    def supported(self) -> list[ReleaseLine]:
        return [r for r in self.releases if r.status == "supported"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


_Name = Annotated[str, StringConstraints(min_length=1)]


class _TensorRT(_Strict):
    major_min: Annotated[int, Field(ge=1)]
    module: _Name
    required_api: list[Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][\w.]*$")]]


class _Python(_Strict):
    min: Annotated[str, StringConstraints(pattern=_VERSION.pattern.join("^$"))]


class _Power(_Strict):
    recommended_modes: Annotated[list[_Name], Field(min_length=1)]
    note: _Name


class _Line(_Strict):
    release: Annotated[str, StringConstraints(pattern=r"^[0-9]{1,4}(\.[0-9]{1,4}){0,2}$")]
    jetpack: _Name
    tensorrt: _Name
    cuda: _Name
    ubuntu: _Name
    python: _Name
    status: Literal["supported", "untested", "unsupported"]
    reason: _Name


class _PlatformFile(_Strict):
    """platform.toml as written: every table and key required, nothing else allowed."""

    schema_: Literal[1] = Field(alias="schema")
    tensorrt: _TensorRT
    python: _Python
    power: _Power
    l4t: Annotated[list[_Line], Field(min_length=1)]

    @model_validator(mode="after")
    def _unique(self) -> _PlatformFile:
        if len({tuple(int(x) for x in line.release.split(".")) for line in self.l4t}) != len(self.l4t):
            raise ValueError("a release line appears twice")
        return self


def load_platform(path: Path) -> Platform:
    """Read and validate platform.toml completely: a typo there must not turn into a wrong verdict."""
    try:
        data = loads_toml(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PlatformFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PlatformFileError(f"{path} is not valid TOML: {exc}") from None
    try:
        f = _PlatformFile.model_validate(data)
    except ValidationError as err:
        raise PlatformFileError(f"{path}: " + "; ".join(problems(err))) from None
    pm = _VERSION.fullmatch(f.python.min)
    assert pm is not None  # the model's pattern
    return Platform(
        tensorrt_major_min=f.tensorrt.major_min,
        tensorrt_module=f.tensorrt.module,
        tensorrt_required_api=tuple(f.tensorrt.required_api),
        python_min=(int(pm.group("major")), int(pm.group("minor"))),
        power_modes=tuple(f.power.recommended_modes),
        power_note=f.power.note,
        releases=tuple(
            ReleaseLine(prefix=tuple(int(x) for x in line.release.split(".")), **line.model_dump()) for line in f.l4t
        ),
    )


# -- what is installed -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Library:
    """A Python library as this interpreter sees it: its version, the API it lacks, or why it is absent."""

    name: str
    version: str | None = None
    error: str | None = None
    missing_api: tuple[str, ...] = ()


def _has(module: Any, dotted: str) -> bool:
    obj = module
    for part in dotted.split("."):
        try:
            obj = getattr(obj, part)
        except Exception:  # a binding's property can raise when touched on the class
            return False
    return True


def probe_library(name: str, required_api: Sequence[str] = (), version_attr: str = "__version__") -> Library:
    """Import ``name`` now (never at module level) and look for ``required_api``; any failure is an answer."""
    try:
        mod = importlib.import_module(name)
    except Exception as exc:  # ImportError, or a broken install (OSError for a missing libnvinfer.so)
        return Library(name, error=f"{type(exc).__name__}: {exc}")
    version = getattr(mod, version_attr, None)
    if isinstance(version, tuple):  # pycuda.VERSION
        version = ".".join(str(v) for v in version)
    return Library(
        name,
        version=str(version) if version is not None else None,
        missing_api=tuple(a for a in required_api if not _has(mod, a)),
    )


def probe_tensorrt(platform: Platform) -> Library:
    return probe_library(platform.tensorrt_module, platform.tensorrt_required_api)


#: What the TensorRT backend calls on ``pycuda.driver`` (appliance/infer/backends/tensorrt.py).
PYCUDA_API = (
    "init",
    "Device",
    "Context",
    "Stream",
    "mem_alloc",
    "pagelocked_empty",
    "memcpy_htod_async",
    "memcpy_dtoh_async",
)


def probe_pycuda() -> Library:
    """The TensorRT backend's device memory and streams come from pycuda (``pycuda.driver``)."""
    lib = probe_library("pycuda.driver", PYCUDA_API)
    if lib.error is None:
        pkg = probe_library("pycuda", version_attr="VERSION")
        lib = Library("pycuda", version=pkg.version, missing_api=lib.missing_api)
    else:
        lib = Library("pycuda", error=lib.error)
    return lib


def probe_power_mode() -> str | None:
    """The nvpmodel mode name (``nvpmodel -q``), or None where nvpmodel is absent or does not answer."""
    exe = shutil.which("nvpmodel")
    if exe is None:
        return None
    try:
        proc = subprocess.run(
            [exe, "-q"], stdin=subprocess.DEVNULL, capture_output=True, timeout=NVPMODEL_TIMEOUT, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    m = _POWER_MODE.search(proc.stdout[:MAX_NVPMODEL_BYTES].decode("ascii", errors="replace"))
    return m.group("mode") if m else None


@dataclass
class Probes:
    """What the checker asks the machine; tests replace these with fakes."""

    tensorrt: Callable[[Platform], Library] = probe_tensorrt
    pycuda: Callable[[], Library] = probe_pycuda
    power_mode: Callable[[], str | None] = probe_power_mode
    python_version: tuple[int, ...] = tuple(sys.version_info[:3])
    executable: str = sys.executable


# -- the verdict -------------------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    #: "ok", "fail" or "info" (information that never changes the verdict).
    status: str
    detail: str


@dataclass
class Report:
    exit_code: int
    verdict: str
    checks: list[Check] = field(default_factory=list)
    release: dict[str, Any] | None = None

    def as_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def as_text(self) -> str:
        width = max((len(c.name) for c in self.checks), default=0)
        lines = [f"  {c.name.ljust(width)}  {c.status.upper():4}  {c.detail}" for c in self.checks]
        return "\n".join([*lines, self.verdict])


def _supported_text(platform: Platform) -> str:
    lines = platform.supported()
    return "; ".join(f"L4T R{r.release} (JetPack {r.jetpack})" for r in lines) or "none listed"


def _venv_hint() -> str:
    """Why JetPack's TensorRT may be invisible to this interpreter, when that is the likely cause."""
    prefix, base = Path(sys.prefix), Path(getattr(sys, "base_prefix", sys.prefix))
    if prefix == base:
        return ""
    cfg = prefix / "pyvenv.cfg"
    try:
        text = cfg.read_text(encoding="utf-8", errors="replace")[:4096]
    except OSError:
        return ""
    if re.search(r"^include-system-site-packages\s*=\s*true\s*$", text, re.MULTILINE | re.IGNORECASE):
        return ""
    return (
        f"; this venv ({prefix}) does not see the system's packages, where JetPack installs TensorRT: "
        "recreate it with python3 -m venv --system-site-packages"
    )


def evaluate(platform: Platform, release_path: Path, probes: Probes) -> Report:
    """Every check, then one verdict: the first failing check decides it, and says what to do."""
    checks: list[Check] = []
    failures: list[str] = []

    def fail(name: str, detail: str, why: str) -> None:
        checks.append(Check(name, "fail", detail))
        failures.append(why)

    release_dict: dict[str, Any] | None = None
    try:
        data = read_release_file(release_path)
        release = parse_release(data, str(release_path)) if data is not None else None
    except ReleaseFileError as exc:
        return Report(
            EXIT_CANNOT_TELL,
            f"CANNOT TELL: {exc}. Compare {release_path} with a known-good box's; on JetPack it comes with the "
            "nvidia-l4t-core package, and reinstalling that package restores it.",
            [Check("L4T release", "fail", str(exc))],
        )
    if release is None:
        checks.append(Check("L4T release", "fail", f"not a Jetson (no {release_path})"))
        failures.append(
            f"not a Jetson (no {release_path}): the GPU path is for Jetson boxes with {_supported_text(platform)}"
        )
    else:
        release_dict = asdict(release)
        line = platform.match(release)
        what = f"{release.text} ({release.kind}), board {release.board or '?'}, {release.eabi or '?'}"
        if line is None:
            fail(
                "L4T release",
                f"{what}: not in platform.toml",
                f"L4T {release.text} is a release this appliance does not know; supported: {_supported_text(platform)}",
            )
        elif line.status == "supported":
            checks.append(Check("L4T release", "ok", f"{what} = JetPack {line.jetpack} (TensorRT {line.tensorrt})"))
        elif line.status == "untested":
            fail(
                "L4T release",
                f"{what} = JetPack {line.jetpack}: not validated",
                f"L4T {release.text}: {line.reason}; validated: {_supported_text(platform)}",
            )
        else:
            fail(
                "L4T release",
                f"{what} = JetPack {line.jetpack}: unsupported",
                f"L4T {release.text}: {line.reason}",
            )

    py = probes.python_version
    py_text = ".".join(str(v) for v in py)
    if tuple(py[:2]) >= platform.python_min:
        checks.append(Check("Python", "ok", f"{py_text} ({probes.executable})"))
    else:
        need = ".".join(str(v) for v in platform.python_min)
        fail("Python", f"{py_text} ({probes.executable})", f"Python {py_text} is older than the {need} required")

    trt = probes.tensorrt(platform)
    if trt.error is not None:
        fail(
            "TensorRT",
            f"not importable as '{platform.tensorrt_module}' by {probes.executable}: {trt.error}",
            "TensorRT's Python bindings are not installed for this Python (on JetPack: sudo apt install "
            f"python3-libnvinfer){_venv_hint()}",
        )
    else:
        m = _VERSION.match(trt.version or "")
        if m is None:
            fail("TensorRT", f"version {trt.version!r} cannot be read", "TensorRT reports no usable version")
        elif int(m.group("major")) < platform.tensorrt_major_min:
            fail(
                "TensorRT",
                f"{trt.version}: older than {platform.tensorrt_major_min}",
                f"TensorRT {trt.version} is installed; the appliance needs TensorRT {platform.tensorrt_major_min} or "
                f"later ({_supported_text(platform)})",
            )
        elif trt.missing_api:
            fail(
                "TensorRT",
                f"{trt.version}: lacks {', '.join(trt.missing_api)}",
                f"TensorRT {trt.version} lacks what the backend calls ({', '.join(trt.missing_api)})",
            )
        else:
            checks.append(Check("TensorRT", "ok", f"{trt.version} (tensor-name API present)"))

    cu = probes.pycuda()
    if cu.error is not None or cu.missing_api:
        fail(
            "pycuda",
            cu.error or f"lacks {', '.join(cu.missing_api)}",
            "pycuda is not usable by this Python: pip install pycuda in the appliance's venv (it builds against "
            "/usr/local/cuda; needs JetPack's CUDA toolkit and python3-dev)",
        )
    else:
        checks.append(Check("pycuda", "ok", cu.version or "installed"))

    mode = probes.power_mode() if release is not None else None
    if release is not None:
        recommended = ", ".join(platform.power_modes)
        if mode is None:
            checks.append(
                Check(
                    "power mode",
                    "info",
                    f"unknown (nvpmodel not found, or no answer from nvpmodel -q); recommended: {recommended}",
                )
            )
        elif mode in platform.power_modes:
            checks.append(Check("power mode", "info", f"{mode} (recommended)"))
        else:
            checks.append(
                Check("power mode", "info", f"{mode}; recommended: {recommended} (firmware/README.md, Power)")
            )

    if failures:
        verdict = (
            f"NOT SUPPORTED for the GPU path: {failures[0]}."
            + (f" ({len(failures) - 1} more problem(s) above.)" if len(failures) > 1 else "")
            + " The appliance still runs, on ONNX Runtime (CPU)."
        )
        return Report(EXIT_UNSUPPORTED, verdict, checks, release_dict)
    return Report(EXIT_SUPPORTED, "SUPPORTED: the TensorRT backend can run here.", checks, release_dict)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="check_platform.py",
        description="Check this box's Jetson Linux release, TensorRT and pycuda against firmware/platform.toml "
        "(what the appliance's GPU path needs). Run it with the appliance's own Python. Exit status: 0 "
        "supported, 1 not supported (the appliance then runs on the CPU), 2 cannot tell or usage error.",
    )
    p.add_argument(
        "--release-file",
        type=Path,
        default=DEFAULT_RELEASE_FILE,
        metavar="PATH",
        help=f"the L4T release file (default {DEFAULT_RELEASE_FILE})",
    )
    p.add_argument(
        "--platform",
        type=Path,
        default=DEFAULT_PLATFORM_FILE,
        metavar="PATH",
        help="the platform requirements (default: platform.toml next to this script)",
    )
    p.add_argument("--json", action="store_true", help="print the checks and verdict as JSON")
    return p


def main(argv: Sequence[str] | None = None, probes: Probes | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        platform = load_platform(args.platform)
    except PlatformFileError as exc:
        print(f"check_platform: {exc}", file=sys.stderr)
        return EXIT_CANNOT_TELL
    report = evaluate(platform, args.release_file, probes or Probes())
    print(report.as_json() if args.json else report.as_text())
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
