"""The systemd unit and its files agree with the appliance they run.

A unit that points at another data directory than the configuration, signals every process at once or
lets systemd stop the receiver when the kernel kills the worker would each look fine and lose the box's
reason to exist; these tests read the unit the way systemd does and compare it with the code and the
shipped configuration, then let systemd's own tools judge it where they are installed.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from appliance.config import Config, load_config
from appliance.ingest.listener import DRAIN_SECONDS

ROOT = Path(__file__).resolve().parents[1]
SYSTEMD = ROOT / "systemd"
UNIT = SYSTEMD / "edge-appliance.service"
CONFIG = SYSTEMD / "appliance.toml"
SYSUSERS = SYSTEMD / "edge-appliance.sysusers.conf"
TMPFILES = SYSTEMD / "edge-appliance.tmpfiles.conf"
#: Where the unit's configuration lives on a box: ARCHITECTURE.md ("/etc/appliance/appliance.toml under systemd").
INSTALLED_CONFIG = "/etc/appliance/appliance.toml"

Unit = dict[str, list[tuple[str, str]]]


def parse_unit(text: str) -> Unit:
    """Sections to (key, value) lists in file order, as systemd reads them: keys may repeat, ``#`` and ``;``
    start comments, a trailing backslash continues a line. Anything else is an error, not skipped."""
    unit: Unit = {}
    section: str | None = None
    pending = ""
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if pending:
            if line.startswith(("#", ";")):
                continue  # comments inside a continuation are skipped by systemd too
            line = pending + " " + line
            pending = ""
        if not line or line.startswith(("#", ";")):
            continue
        if line.endswith("\\"):
            pending = line[:-1].rstrip()
            continue
        if line.startswith("["):
            assert line.endswith("]"), f"line {n}: malformed section header {raw!r}"
            section = line[1:-1]
            unit.setdefault(section, [])
            continue
        assert section is not None, f"line {n}: {raw!r} before any section"
        assert "=" in line, f"line {n}: {raw!r} is not KEY=VALUE"
        key, value = line.split("=", 1)
        unit[section].append((key.strip(), value.strip()))
    assert not pending, "the file ends inside a continued line"
    return unit


def values(unit: Unit, section: str, key: str) -> list[str]:
    """Every value of ``key``, an empty assignment resetting the list as it does in systemd."""
    out: list[str] = []
    for k, v in unit.get(section, []):
        if k == key:
            out = [] if v == "" else [*out, v]
    return out


def last(unit: Unit, section: str, key: str) -> str | None:
    """The effective value of a single-valued setting: the last assignment wins."""
    found = [v for k, v in unit.get(section, []) if k == key]
    return found[-1] if found else None


def seconds(span: str) -> float:
    """A systemd time span ("90s", "1min 30s", "90") in seconds."""
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600}
    total = 0.0
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span.strip())
    assert parts and "".join(a + b for a, b in parts) == re.sub(r"\s+", "", span), f"not a time span: {span!r}"
    for number, unit in parts:
        assert unit in units or unit == "", f"unknown time unit in {span!r}"
        total += float(number) * units.get(unit, 1)
    return total


@pytest.fixture(scope="module")
def unit() -> Unit:
    return parse_unit(UNIT.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def cfg() -> Config:
    return load_config(CONFIG)


def _command(unit: Unit, key: str) -> list[str]:
    cmds = values(unit, "Service", key)
    assert len(cmds) == 1, f"{key}: expected one command, found {cmds}"
    return shlex.split(cmds[0].lstrip("-+!@:"))


# -- the parser itself (the tests below rely on it) ---------------------------------------------------------


def test_parser_reads_repeats_continuations_and_resets() -> None:
    u = parse_unit("[Service]\n# c\nEnvironment=A=1\nEnvironment=B=2 \\\n  C=3\nX=\nX=1\nX=2\n[Install]\nWantedBy=a\n")
    assert values(u, "Service", "Environment") == ["A=1", "B=2 C=3"]
    assert values(u, "Service", "X") == ["1", "2"]
    assert last(u, "Install", "WantedBy") == "a"
    with pytest.raises(AssertionError):
        parse_unit("Key=before a section\n")
    with pytest.raises(AssertionError):
        parse_unit("[Service]\nno equals sign\n")
    assert seconds("90s") == 90 and seconds("1min 30s") == 90 and seconds("90") == 90
    with pytest.raises(AssertionError):
        seconds("ninety")


# -- what it runs --------------------------------------------------------------------------------------------


def test_exec_start_is_appliance_serve_with_the_installed_config(unit: Unit) -> None:
    argv = _command(unit, "ExecStart")
    assert Path(argv[0]).is_absolute() and argv[0].endswith("/bin/appliance"), argv
    assert argv[1:] == ["serve", "--config", INSTALLED_CONFIG], argv


def test_exec_start_pre_checks_the_same_config(unit: Unit) -> None:
    pre = _command(unit, "ExecStartPre")
    assert pre == [_command(unit, "ExecStart")[0], "check-config", "--config", INSTALLED_CONFIG], pre


def test_the_shipped_config_is_what_the_readme_installs_at_that_path() -> None:
    readme = (SYSTEMD / "README.md").read_text(encoding="utf-8")
    install_lines = [ln for ln in readme.splitlines() if ln.startswith("install ") and "systemd/appliance.toml" in ln]
    assert install_lines, "systemd/README.md does not say how systemd/appliance.toml is installed"
    assert all(ln.split()[-1] == INSTALLED_CONFIG for ln in install_lines), install_lines
    for needed in ("systemctl daemon-reload", "systemctl enable --now edge-appliance", "journalctl -u edge-appliance"):
        assert needed in readme, needed


def test_type_matches_the_readiness_the_code_has(unit: Unit) -> None:
    source = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "appliance").rglob("*.py"))
    notifies = "NOTIFY_SOCKET" in source or "sd_notify" in source
    kind = last(unit, "Service", "Type")
    if notifies:
        assert kind == "notify"
    else:  # Type=notify without sd_notify would time the start out and kill a working appliance
        assert kind in ("simple", "exec"), kind


# -- where the data is ---------------------------------------------------------------------------------------


def test_data_dir_is_the_directory_the_unit_lets_it_write(unit: Unit, cfg: Config) -> None:
    data_dir = cfg.storage.data_dir
    assert data_dir.is_absolute(), f"{CONFIG}: data_dir {data_dir} would depend on the working directory"
    state = values(unit, "Service", "StateDirectory")
    assert state, "no StateDirectory="
    state_paths = [Path("/var/lib") / s for s in " ".join(state).split()]
    assert data_dir in state_paths, (data_dir, state_paths)
    writable = [Path(p.lstrip("-")) for p in " ".join(values(unit, "Service", "ReadWritePaths")).split()]
    assert data_dir in writable, (data_dir, writable)
    assert last(unit, "Service", "WorkingDirectory") == str(data_dir)
    mode = last(unit, "Service", "StateDirectoryMode")
    assert mode is not None and int(mode, 8) & 0o027 == 0, f"StateDirectoryMode={mode}: the appliance keeps it 0750"


def test_tmpfiles_creates_that_directory_for_the_service_user(unit: Unit, cfg: Config) -> None:
    lines = [ln.split() for ln in TMPFILES.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    by_path = {ln[1]: ln for ln in lines}
    user = last(unit, "Service", "User")
    data = by_path[str(cfg.storage.data_dir)]
    assert data[0] == "d" and data[3] == user and int(data[2], 8) & 0o027 == 0, data
    etc = by_path[str(Path(INSTALLED_CONFIG).parent)]
    assert etc[3] == "root" and etc[4] == last(unit, "Service", "Group"), (
        "the service must read but not write its config"
    )


def test_the_shipped_config_keeps_every_other_default(cfg: Config) -> None:
    dumped, default = cfg.model_dump(), Config().model_dump()
    dumped["storage"].pop("data_dir")
    default["storage"].pop("data_dir")
    assert dumped == default  # the README's defaults hold on a box; a site changes its own copy


# -- who it runs as ------------------------------------------------------------------------------------------


def test_runs_as_the_unprivileged_account_sysusers_creates(unit: Unit) -> None:
    user, group = last(unit, "Service", "User"), last(unit, "Service", "Group")
    assert user and user not in ("root", "0"), user
    assert group and group not in ("root", "0"), group
    assert last(unit, "Service", "DynamicUser") in (None, "no")  # a dynamic user would orphan the data's owner
    entries = [ln.split() for ln in SYSUSERS.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    users = [e for e in entries if e[0] == "u"]
    assert [e[1] for e in users] == [user]
    assert users[0][-1] in ("/usr/sbin/nologin", "/sbin/nologin", "/bin/false"), "a service account has no shell"
    assert ["m", user, "video"] in entries, "the Jetson's GPU device nodes belong to group video"


def test_no_capability_unless_the_dicom_port_needs_one(unit: Unit, cfg: Config) -> None:
    ambient = " ".join(values(unit, "Service", "AmbientCapabilities")).split()
    bounding = " ".join(values(unit, "Service", "CapabilityBoundingSet")).split()
    ports = [cfg.dicom.port, cfg.metrics.port, cfg.panel.port]
    if min(ports) < 1024:
        assert "CAP_NET_BIND_SERVICE" in ambient and "CAP_NET_BIND_SERVICE" in bounding
    else:
        assert ambient == [] and bounding == [], (ambient, bounding)


# -- restarting and stopping ---------------------------------------------------------------------------------


def test_restarts_on_failure_and_survives_a_worker_oom_kill(unit: Unit) -> None:
    assert last(unit, "Service", "Restart") == "on-failure"
    assert seconds(last(unit, "Service", "RestartSec") or "0") >= 1  # not a busy loop on a bad config
    # systemd's default OOMPolicy=stop would stop the receiver because the kernel killed the worker.
    assert last(unit, "Service", "OOMPolicy") == "continue"


def test_stop_lets_the_supervisor_drain_in_order(unit: Unit, cfg: Config) -> None:
    assert last(unit, "Service", "KillSignal") in (None, "SIGTERM", "TERM", "15")
    # control-group would SIGTERM every process at once and skip the supervisor's order.
    assert last(unit, "Service", "KillMode") == "mixed"
    timeout = last(unit, "Service", "TimeoutStopSec")
    assert timeout is not None, "TimeoutStopSec must be explicit"
    # appliance/service.py, Supervisor._shut_down: listeners and worker DRAIN_SECONDS + 3; the panel's
    # task dispatcher 5 s; then the threads joined one after another: assemble, route and retention 5 s
    # each, export timeout_seconds + 5.
    budget = (DRAIN_SECONDS + 3) + 5 + 3 * 5 + (cfg.export.timeout_seconds + 5)
    assert seconds(timeout) >= budget + 10, f"TimeoutStopSec={timeout} < {budget} s the appliance may take (+10)"
    assert seconds(timeout) <= 300, "a stop that can hang for minutes blocks reboots and updates"


# -- the sandbox ---------------------------------------------------------------------------------------------


def test_hardening_is_on(unit: Unit) -> None:
    for key, want in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
    }.items():
        assert last(unit, "Service", key) == want, key
    families = set(" ".join(values(unit, "Service", "RestrictAddressFamilies")).split())
    assert families == {"AF_INET", "AF_INET6", "AF_UNIX"}, families
    filters = values(unit, "Service", "SystemCallFilter")
    assert filters and filters[0] == "@system-service"
    # The worker lowers its priority with os.nice() (setpriority, in @resources).
    assert not any("~" in f and "@resources" in f for f in filters), filters


@pytest.mark.parametrize(
    ("key", "why"),
    [
        ("PrivateDevices", "the Jetson's GPU is device nodes (/dev/nvmap, /dev/nvgpu/*)"),
        ("ProtectClock", "implies DeviceAllow=char-rtc, which closes every other device on older systemd"),
        ("PrivateUsers", "maps the video group to nobody: no GPU"),
        ("MemoryDenyWriteExecute", "CUDA and TensorRT generate code at run time"),
    ],
)
def test_no_setting_that_takes_the_gpu_away(unit: Unit, key: str, why: str) -> None:
    assert last(unit, "Service", key) in (None, "no", "false"), f"{key}=yes: {why}"


def test_no_device_allow_list(unit: Unit) -> None:
    assert not values(unit, "Service", "DeviceAllow"), "any DeviceAllow= closes the GPU's device nodes"
    assert last(unit, "Service", "DevicePolicy") in (None, "auto")
    assert last(unit, "Service", "ProcSubset") in (None, "all"), "ONNX Runtime reads /proc/cpuinfo"


# -- systemd's own judgement ---------------------------------------------------------------------------------


def _runnable_copy(tmp_path: Path, unit: Unit) -> Path:
    """The unit with its program replaced by a stand-in: systemd-analyze verify refuses a missing executable,
    and /opt/edge-appliance is not on this machine. Nothing else in the file changes."""
    exe = _command(unit, "ExecStart")[0]
    stand_in = tmp_path / "bin" / "appliance"
    stand_in.parent.mkdir()
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(0o755)
    text = UNIT.read_text(encoding="utf-8")
    assert text.count(exe) == 2  # ExecStartPre and ExecStart
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(exe, str(stand_in)), encoding="utf-8")
    return copy


def _systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip(
            "systemd-analyze is not installed here (apt install systemd): the unit is checked by the tests above only"
        )
    return exe


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path, unit: Unit) -> None:
    exe = _systemd_analyze()
    copy = _runnable_copy(tmp_path, unit)
    proc = subprocess.run(
        [exe, "verify", "--man=no", str(copy)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    out = (proc.stdout + proc.stderr).strip()
    # verify exits 0 on unknown keys too, with a warning: any line about the file is a failure here.
    complaints = [ln for ln in out.splitlines() if copy.name in ln or str(copy) in ln]
    assert proc.returncode == 0 and not complaints, out


def test_systemd_analyze_security_rates_the_unit_ok(tmp_path: Path, unit: Unit) -> None:
    exe = _systemd_analyze()
    copy = _runnable_copy(tmp_path, unit)
    proc = subprocess.run(
        [exe, "security", "--offline=yes", "--no-pager", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    if proc.returncode != 0 and "offline" in proc.stderr:
        pytest.skip(f"this systemd-analyze has no --offline (systemd 250 and later): {proc.stderr.strip()}")
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    # 1.9 today; "OK" ends at 3.9 in systemd's scale. Above 3.0 a protection was dropped: find out which.
    assert float(m.group(1)) <= 3.0, proc.stdout


def test_sysusers_and_tmpfiles_make_the_account_and_directories(tmp_path: Path, unit: Unit, cfg: Config) -> None:
    sysusers, tmpfiles = shutil.which("systemd-sysusers"), shutil.which("systemd-tmpfiles")
    if sysusers is None or tmpfiles is None:
        pytest.skip("systemd-sysusers/systemd-tmpfiles are not installed here")
    if os.geteuid() != 0:
        pytest.skip("creating files owned by another user in a scratch root needs root")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (root / "etc" / "group").write_text("root:x:0:\nvideo:x:44:\n")
    for name in ("shadow", "gshadow"):
        (root / "etc" / name).write_text("")
        (root / "etc" / name).chmod(0o600)
    for exe, conf in ((sysusers, SYSUSERS), (tmpfiles, TMPFILES)):
        args = [exe, f"--root={root}"] + (["--create"] if exe == tmpfiles else []) + ["-"]
        proc = subprocess.run(args, input=conf.read_text(), capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
    user = last(unit, "Service", "User")
    assert user is not None
    passwd = {ln.split(":")[0]: ln.split(":") for ln in (root / "etc" / "passwd").read_text().splitlines()}
    groups = {ln.split(":")[0]: ln.split(":") for ln in (root / "etc" / "group").read_text().splitlines()}
    assert user in passwd and int(passwd[user][2]) != 0 and passwd[user][6].endswith("nologin"), passwd.get(user)
    assert user in groups["video"][3].split(","), groups["video"]
    data = root / str(cfg.storage.data_dir).lstrip("/")
    st = data.stat()
    assert st.st_uid == int(passwd[user][2]) and stat.S_IMODE(st.st_mode) == 0o750
    etc = (root / INSTALLED_CONFIG.lstrip("/")).parent.stat()
    assert etc.st_uid == 0 and etc.st_gid == int(groups[user][2]) and stat.S_IMODE(etc.st_mode) == 0o750
