"""firmware/: platform.toml agrees with the code it describes, and check_platform.py gives the right verdict.

The checker reads a file anyone with root on the box can replace, so besides the real release strings it
gets garbage, a huge file, a FIFO, a device and random bytes, and must answer each with a verdict, never a
traceback or a hang. TensorRT and pycuda are faked: this machine has neither, a Jetson has both.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIRMWARE = ROOT / "firmware"
CHECKER = FIRMWARE / "check_platform.py"
PLATFORM = FIRMWARE / "platform.toml"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_platform", CHECKER)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["check_platform"] = mod  # dataclasses look their module up while being defined
    spec.loader.exec_module(mod)
    return mod


cp = _load()

# The example from JetPack 6.0 (L4T R36.3), and its KERNEL_VARIANT line.
JP60 = (
    "# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic, EABI: aarch64, DATE: Mon May  6 17:34:21 UTC 2024\n"
    "# KERNEL_VARIANT: oot\n"
    "TARGET_USERSPACE_LIB_DIR=nvidia\n"
    "TARGET_USERSPACE_LIB_DIR_PATH=usr/lib/aarch64-linux-gnu/nvidia\n"
)
# Same format, a supported line (GCID and date made up for the fixture).
JP62 = (
    "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan  8 01:49:37 UTC 2025\n"
    "# KERNEL_VARIANT: oot\n"
)
# JetPack 4 style: the header, then a checksum list (which is why the file may be a few KB).
JP46 = (
    "# R32 (release), REVISION: 7.1, GCID: 29818004, BOARD: t210ref, EABI: aarch64, DATE: Sat Feb 19 17:05:08 UTC 2022\n"
    + ("".join(f"{i:040x} */usr/lib/aarch64-linux-gnu/tegra/libnv{i}.so\n" for i in range(60)))
)
JP5 = "# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, DATE: Tue Aug  1 19:57:35 UTC 2023\n"
THOR = "# R38 (release), REVISION: 2.0, GCID: 40000000, BOARD: generic, EABI: aarch64, DATE: Mon Aug 25 12:00:00 UTC 2025\n"
FUTURE = "# R37 (release), REVISION: 1.0, GCID: 1, BOARD: generic, EABI: aarch64, DATE: Thu Jan  1 00:00:00 UTC 2026\n"


def good_probes(**changes: object) -> Any:
    """What a correctly set-up JetPack 6.2 box answers."""
    base: dict[str, object] = dict(
        tensorrt=lambda platform: cp.Library("tensorrt", version="10.3.0.30"),
        pycuda=lambda: cp.Library("pycuda", version="2025.1"),
        power_mode=lambda: "MAXN",
        python_version=(3, 10, 12),
        executable="/opt/edge-appliance/venv/bin/python",
    )
    base.update(changes)
    return cp.Probes(**base)


def run(
    tmp_path: Path, content: str | bytes | None, capsys: pytest.CaptureFixture[str], probes: Any = None, *extra: str
) -> tuple[int, str]:
    """main() on a release file with ``content`` (None: no file at all); returns (exit code, stdout)."""
    path = tmp_path / "nv_tegra_release"
    if isinstance(content, str):
        path.write_text(content, encoding="ascii")
    elif isinstance(content, bytes):
        path.write_bytes(content)
    code = cp.main(["--release-file", str(path), *extra], probes=probes or good_probes())
    out = capsys.readouterr().out
    return code, out


# -- platform.toml against the code ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def platform() -> Any:
    return cp.load_platform(PLATFORM)


def test_supported_releases_meet_the_requirements(platform: Any) -> None:
    supported = platform.supported()
    assert supported, "platform.toml lists no supported release"
    for line in supported:
        assert int(line.tensorrt.split(".")[0]) >= platform.tensorrt_major_min, line
        assert tuple(int(x) for x in line.python.split(".")[:2]) >= platform.python_min, line
    for line in platform.releases:
        if line.status != "supported":
            assert len(line.reason) > 20, f"{line.release}: say why it is not supported, and what to do"


def test_python_minimum_is_pyprojects() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    m = re.search(r'^requires-python = ">=(\d+)\.(\d+)"', pyproject, re.MULTILINE)
    assert m
    assert cp.load_platform(PLATFORM).python_min == (int(m.group(1)), int(m.group(2)))


def test_required_api_is_what_the_backend_calls(platform: Any) -> None:
    """Every name the checker demands is used by the backend, so the checker never refuses a box for an API
    the code does not need (the converse, the code calling something unlisted, shows up on the first Jetson)."""
    backends = ROOT / "appliance" / "infer" / "backends"
    source = "\n".join((backends / n).read_text(encoding="utf-8") for n in ("tensorrt.py", "trt_engines.py"))
    for dotted in platform.tensorrt_required_api:
        name = dotted.split(".")[-1]
        assert re.search(rf"\.{name}\b", source), f"platform.toml requires {dotted}; the backend never uses .{name}"
    for name in cp.PYCUDA_API:
        assert re.search(rf"cuda\.{name}\b", source), f"check_platform requires pycuda.driver.{name}; unused"
    assert "create_network(0)" in source, "the TensorRT 10 requirement rests on create_network(0): re-check it"


def test_platform_file_typos_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = PLATFORM.read_text(encoding="utf-8")
    for broken in (
        text.replace('status = "supported"', 'status = "suported"', 1),
        text.replace("major_min = 10", 'major_min = "10"', 1),
        text.replace('release = "36.4"', 'release = "R36.4"', 1),
        text.replace('release = "36.3"', 'release = "36.4"', 1),  # the same line twice
        text.replace("[python]", "[python]\nmax = 3.12", 1),
        text + "\n[[l4t]]\nrelease = 39\n",
        "not toml [",
    ):
        assert broken != text or broken == "not toml ["
        bad = tmp_path / "platform.toml"
        bad.write_text(broken, encoding="utf-8")
        code = cp.main(["--platform", str(bad), "--release-file", str(tmp_path / "none")], probes=good_probes())
        captured = capsys.readouterr()
        assert code == cp.EXIT_CANNOT_TELL, broken[:200]
        assert str(bad) in captured.err and not captured.out


# -- verdicts ----------------------------------------------------------------------------------------------


def test_a_supported_box(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(tmp_path, JP62, capsys)
    assert code == cp.EXIT_SUPPORTED, out
    assert out.rstrip().endswith("SUPPORTED: the TensorRT backend can run here.")
    assert "R36.4.3" in out and "JetPack 6.1, 6.2, 6.2.1" in out and "MAXN (recommended)" in out


def test_jetpack_6_0_is_refused_with_the_upgrade_to_make(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(tmp_path, JP60, capsys)
    assert code == cp.EXIT_UNSUPPORTED
    verdict = out.strip().splitlines()[-1]
    assert verdict.startswith("NOT SUPPORTED for the GPU path: L4T R36.3.0: JetPack 6.0 ships TensorRT 8.6")
    assert "upgrade to JetPack 6.1 or later" in verdict and "ONNX Runtime (CPU)" in verdict


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (JP46, "these modules cannot run JetPack 6"),
        (JP5, "JetPack 5 ships TensorRT 8.5"),
        (THOR, "has not been validated"),
        (FUTURE, "L4T R37.1.0 is a release this appliance does not know"),
    ],
)
def test_other_releases(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, expected: str) -> None:
    code, out = run(tmp_path, content, capsys)
    assert code == cp.EXIT_UNSUPPORTED
    assert expected in out.strip().splitlines()[-1], out


def test_the_most_specific_release_line_wins(tmp_path: Path) -> None:
    text = PLATFORM.read_text(encoding="utf-8") + (
        '\n[[l4t]]\nrelease = "36"\njetpack = "6.x"\ntensorrt = "8.6"\ncuda = "12.2"\nubuntu = "22.04"\n'
        'python = "3.10"\nstatus = "unsupported"\nreason = "every other R36 release"\n'
    )
    p = tmp_path / "platform.toml"
    p.write_text(text, encoding="utf-8")
    platform = cp.load_platform(p)
    assert platform.match(cp.parse_release(JP62.encode())).release == "36.4"
    assert platform.match(cp.parse_release(JP60.encode())).release == "36.3"
    r369 = cp.parse_release(JP62.replace("REVISION: 4.3", "REVISION: 9.0").encode())
    assert platform.match(r369).release == "36"


def test_tensorrt_missing_says_how_to_install_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    absent = good_probes(
        tensorrt=lambda p: cp.Library("tensorrt", error="ModuleNotFoundError: No module named 'tensorrt'")
    )
    code, out = run(tmp_path, JP62, capsys, absent)
    assert code == cp.EXIT_UNSUPPORTED
    assert "python3-libnvinfer" in out and "No module named 'tensorrt'" in out


@pytest.mark.parametrize(
    ("library", "expected"),
    [
        (dict(version="8.6.2.3"), "TensorRT 8.6.2.3 is installed; the appliance needs TensorRT 10 or later"),
        (dict(version="ten"), "TensorRT reports no usable version"),
        (dict(version=None), "TensorRT reports no usable version"),
        (dict(version="10.3.0", missing_api=("IExecutionContext.execute_async_v3",)), "lacks what the backend calls"),
    ],
)
def test_tensorrt_too_old_or_incomplete(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], library: dict[str, object], expected: str
) -> None:
    probes = good_probes(tensorrt=lambda p: cp.Library("tensorrt", **library))
    code, out = run(tmp_path, JP62, capsys, probes)
    assert code == cp.EXIT_UNSUPPORTED
    assert expected in out.strip().splitlines()[-1], out


def test_pycuda_and_python_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(tmp_path, JP62, capsys, good_probes(pycuda=lambda: cp.Library("pycuda", error="ImportError: x")))
    assert code == cp.EXIT_UNSUPPORTED and "pip install pycuda" in out
    code, out = run(tmp_path, JP62, capsys, good_probes(python_version=(3, 8, 10)))
    assert code == cp.EXIT_UNSUPPORTED and "Python 3.8.10 is older than the 3.10 required" in out


def test_the_power_mode_informs_but_never_decides(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(tmp_path, JP62, capsys, good_probes(power_mode=lambda: "15W"))
    assert code == cp.EXIT_SUPPORTED
    assert "15W; recommended: MAXN, MAXN_SUPER" in out
    code, out = run(tmp_path, JP62, capsys, good_probes(power_mode=lambda: None))
    assert code == cp.EXIT_SUPPORTED and "unknown" in out


def test_nvpmodel_is_asked_with_a_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "nvpmodel"
    fake.write_text("#!/bin/sh\necho 'NV Power Mode: MAXN_SUPER'\necho 2\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")
    assert cp.probe_power_mode() == "MAXN_SUPER"
    fake.write_text("#!/bin/sh\nsleep 30\n")
    monkeypatch.setattr(cp, "NVPMODEL_TIMEOUT", 0.5)
    assert cp.probe_power_mode() is None  # a hung nvpmodel costs half a second, not the check


def test_json_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(tmp_path, JP60, capsys, None, "--json")
    report = json.loads(out)
    assert code == report["exit_code"] == cp.EXIT_UNSUPPORTED
    assert report["release"]["major"] == 36 and report["release"]["minor"] == 3
    assert [c["name"] for c in report["checks"]][:2] == ["L4T release", "Python"]


# -- hostile release files ---------------------------------------------------------------------------------


def test_no_release_file_means_not_a_jetson(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(tmp_path, None, capsys)
    assert code == cp.EXIT_UNSUPPORTED
    assert f"not a Jetson (no {tmp_path / 'nv_tegra_release'})" in out


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "empty"),
        (b"hello world\n", "first line is not an L4T release header"),
        (b"# R36 (release), REVISION: 3.0\x00\n", "NUL bytes"),
        ("# R36 (release), REVISION: 3.0, BOARD: g\u00e9n\u00e9ric\n".encode(), "not ASCII text"),
        (b"# R36 (release), GCID: 1, BOARD: generic\n", "no REVISION"),
        (b"# R36 (release), REVISION: 3\n", "is not <number>.<number>"),
        (b"# R36 (release), REVISION: 3.0, REVISION: 4.0\n", "appears twice"),
        (b"# R36 (release), REVISION:  3.0\n", "surrounding spaces"),
        (b"# R36 (release), REVISION: 3.0,BOARD: generic\n", "malformed field"),
        (b"# R36 (release), REVISION: 3.0, BOARD: generic\r\n", "malformed field"),
        (b"# R36 (release), REVISION: 3.0, BOARD: \x1b[2Jgeneric\n", "malformed field"),
        (b"# R99999 (release), REVISION: 3.0\n", "not an L4T release header"),
        (b"# R36 (release), REVISION: 3.0, " + b"X: y, " * 200 + b"\n", "characters, not a release header"),
    ],
)
def test_garbage_cannot_tell(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, expected: str) -> None:
    code, out = run(tmp_path, content, capsys)
    assert code == cp.EXIT_CANNOT_TELL, out
    assert expected in out and out.strip().splitlines()[-1].startswith("CANNOT TELL: ")
    assert "\x1b" not in out and "\r" not in out  # the file's control characters never reach the terminal


def test_a_huge_file_is_not_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cp.MAX_RELEASE_BYTES <= 64 * 1024  # the bound the README promises
    huge = JP62 + "#" * 200_000
    code, out = run(tmp_path, huge, capsys)
    assert code == cp.EXIT_CANNOT_TELL and "not a release file" in out
    # the limit is a property of the bytes read, not of what fstat says (/proc files report 0)
    path = tmp_path / "big"
    path.write_text(huge)
    with pytest.raises(cp.ReleaseFileError, match="not a release file"):
        cp.read_release_file(path)
    path.write_text(JP46)
    assert cp.read_release_file(path) == JP46.encode()  # a real JetPack 4 file with its checksums fits


def test_special_files_are_refused_without_reading(tmp_path: Path) -> None:
    for special in (Path("/dev/zero"), tmp_path):
        with pytest.raises(cp.ReleaseFileError, match="not a regular file"):
            cp.read_release_file(special)
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "nowhere")
    assert cp.read_release_file(link) is None


def test_a_fifo_does_not_hang_the_checker(tmp_path: Path) -> None:
    fifo = tmp_path / "nv_tegra_release"
    os.mkfifo(fifo)
    proc = subprocess.run(
        [sys.executable, str(CHECKER), "--release-file", str(fifo)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == cp.EXIT_CANNOT_TELL, proc.stdout + proc.stderr
    assert "not a regular file" in proc.stdout


def test_the_command_line(tmp_path: Path) -> None:
    helped = subprocess.run([sys.executable, str(CHECKER), "--help"], capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and "--release-file" in helped.stdout and "--platform" in helped.stdout
    bad = subprocess.run([sys.executable, str(CHECKER), "--bogus"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unrecognized arguments" in bad.stderr
    if Path("/etc/nv_tegra_release").exists():
        pytest.skip("this machine is a Jetson: the not-a-Jetson message is covered with a missing fixture file")
    proc = subprocess.run([sys.executable, str(CHECKER)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == cp.EXIT_UNSUPPORTED, proc.stdout + proc.stderr
    assert "not a Jetson (no /etc/nv_tegra_release)" in proc.stdout and not proc.stderr


# -- fuzz ----------------------------------------------------------------------------------------------------


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(3)
        i = rng.randrange(len(b) + 1)
        if op == 0 and b:
            b[min(i, len(b) - 1)] = rng.randrange(256)
        elif op == 1:
            b[i:i] = bytes([rng.randrange(256)])
        elif b:
            del b[min(i, len(b) - 1)]
    return bytes(b)


def test_fuzzed_release_files_never_raise(tmp_path: Path, platform: Any) -> None:
    rng = random.Random(20261206)
    seeds = [s.encode() for s in (JP60, JP62, JP46, JP5, THOR)]
    path = tmp_path / "nv_tegra_release"
    parsed = 0
    for i in range(3000):
        data = (
            bytes(rng.randrange(256) for _ in range(rng.randrange(300)))
            if i % 3 == 0
            else _mutate(rng, rng.choice(seeds))
        )
        try:
            rel = cp.parse_release(data)
        except cp.ReleaseFileError as exc:
            assert str(exc).startswith("release file: ")
            continue
        parsed += 1
        assert data.startswith(b"# R") and rel.major >= 0 and rel.minor >= 0 and rel.patch >= 0
        if i % 10 == 0:  # the whole path, file and verdict, on a share of them
            path.write_bytes(data)
            report = cp.evaluate(platform, path, good_probes())
            assert report.exit_code in (cp.EXIT_SUPPORTED, cp.EXIT_UNSUPPORTED, cp.EXIT_CANNOT_TELL)
    assert 100 < parsed < 2000, parsed  # the mutations reach both the accepting and the refusing paths


@pytest.mark.parametrize("old,new,what", [
    ('schema = 1', 'schema = 2', "schema"),
    ('major_min = 10', 'major_min = true', "major_min"),
    ('major_min = 10', 'major_min = 0', "major_min"),
    ('module = "tensorrt"', 'module = ""', "module"),
    ('min = "3.10"', 'min = "three"', "python.min"),
    ('recommended_modes = ["MAXN", "MAXN_SUPER"]', 'recommended_modes = []', "recommended_modes"),
    ('release = "36.3"', 'release = "36.4"', "twice"),
    ('release = "36.3"', 'release = "36.04"', "twice"),  # the same release, written otherwise
    ('release = "36.3"', 'release = "R36"', "release"),
    ('status = "untested"', 'status = "maybe"', "status"),
    ('[python]', '[pyhton]', "pyhton"),
    ('cuda = "12.6"', 'cuda = "12.6"\nkernel = "5.15"', "kernel"),
])
def test_a_wrong_platform_file_is_refused_and_named(tmp_path: Path, old: str, new: str, what: str) -> None:
    """A typo in platform.toml must stop the checker with the place named, never become a wrong verdict."""
    text = PLATFORM.read_text(encoding="utf-8")
    assert old in text
    p = tmp_path / "platform.toml"
    p.write_text(text.replace(old, new, 1), encoding="utf-8")
    with pytest.raises(cp.PlatformFileError, match=re.escape(what)):
        cp.load_platform(p)
