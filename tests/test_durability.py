"""Power-cut durability: SIGKILL the whole appliance while DCMTK's storescu is sending.

What an acknowledged C-STORE promises: the modality may delete its copy. So every instance that
storescu logged "Received Store Response (Success)" for must be in the index and on disk, intact,
after the appliance is killed at any moment and started again.
"""

from __future__ import annotations

import os
import random
import subprocess
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest

from conftest import CALLED_AE, Appliance, dcmtk_env, need_tool, parse_storescu
from appliance_dev.dicom_factory import Instance, make_series

pytestmark = pytest.mark.slow

N_INSTANCES = 300


def start_storescu(app: Appliance, directory: Path) -> subprocess.Popen[str]:
    cmd = [need_tool("storescu"), "-v", "-xs", "+sd", "+r", "-aet", "MODALITY", "-aec", CALLED_AE,
           "127.0.0.1", str(app.port), str(directory)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dcmtk_env())


def kill_after_successes(app: Appliance, proc: subprocess.Popen[str], successes: int, jitter: float) -> str:
    """Read storescu's log as it comes; SIGKILL the appliance once ``successes`` were acknowledged."""
    assert proc.stdout is not None
    lines = []
    seen = 0
    killed = False
    for line in proc.stdout:
        lines.append(line)
        if not killed and "Received Store Response (Success)" in line:
            seen += 1
            if seen >= successes:
                time.sleep(jitter)  # land the kill somewhere inside the next instance's handling
                app.kill()
                killed = True
    proc.wait(60)
    assert killed, "storescu finished before the kill; the test did not test anything"
    return "".join(lines)


def assert_acknowledged_are_durable(app: Appliance, acked: dict[str, Instance]) -> None:
    rows = {r["sop_instance_uid"]: r for r in app.query("SELECT sop_instance_uid, path FROM instances")}
    missing = [uid for uid in acked if uid not in rows]
    assert not missing, f"{len(missing)} acknowledged instance(s) lost by the kill, e.g. {missing[:3]}"
    for uid, inst in acked.items():
        path = app.spool / rows[uid]["path"]
        assert path == app.spool / inst.study_uid / inst.series_uid / f"{uid}.dcm"
        ds = pydicom.dcmread(path)
        assert ds.SOPInstanceUID == uid
        assert ds.InstanceNumber == inst.number
        assert ds.PixelData == inst.pixels, f"pixel data of {uid} differs from what was sent"


def test_sigkill_loses_no_acknowledged_instance(appliance_factory: Any, tmp_path: Path) -> None:
    series = make_series(tmp_path / "series", N_INSTANCES, rows=128, cols=128)
    by_name = {i.path.name: i for i in series}
    app = appliance_factory()
    acked: dict[str, Instance] = {}
    rng = random.Random(20250101)
    # Kill after this many acknowledgements of the round, plus a little jitter; then a final clean round.
    plan = [(15, 0.0), (40, 0.004), (70, 0.011), (25, 0.002), None]
    killed_rounds = 0

    for round_no, step in enumerate(plan):
        pending = [i for i in series if i.sop_instance_uid not in acked]
        assert pending, "everything was acknowledged before the last kill"
        round_dir = tmp_path / f"round{round_no}"
        round_dir.mkdir()
        for inst in pending:
            os.link(inst.path, round_dir / inst.path.name)
        proc = start_storescu(app, round_dir)
        if step is None:
            out, _ = proc.communicate(timeout=180)
            assert proc.returncode == 0, out[-3000:]
        else:
            successes, jitter = step
            out = kill_after_successes(app, proc, successes, jitter + rng.random() * 0.003)
            killed_rounds += 1
        statuses = parse_storescu(out)
        newly = 0
        for sent_path, status in statuses.items():
            if status == "Success":
                inst = by_name[Path(sent_path).name]
                if inst.sop_instance_uid not in acked:
                    newly += 1
                acked[inst.sop_instance_uid] = inst
        if step is None:
            assert newly == len(pending), out[-3000:]
            break
        # What an interrupted write leaves (the kill rarely lands inside one: plant one to be sure).
        planted = app.spool / ".incoming" / f"{4_000_000 + round_no}-0.part"
        planted.write_bytes(b"half an instance")
        # Restart, as after a power cut.
        app.start()
        assert app.partials() == [], f"partial files survived the restart: {app.partials()}"
        open_assocs = app.query("SELECT COUNT(*) AS n FROM associations WHERE outcome IS NULL")[0]["n"]
        assert open_assocs == 0, "associations of the killed process were not marked lost"
        assert_acknowledged_are_durable(app, acked)

    assert killed_rounds >= 3
    assert len(acked) == N_INSTANCES
    assert_acknowledged_are_durable(app, acked)
    # After the resends, index and spool agree exactly: no orphan file, no row without a file.
    rows = app.query("SELECT path FROM instances")
    assert sorted(app.spool / r["path"] for r in rows) == app.spool_files()
    [s] = app.series()
    assert s["instances"] == N_INSTANCES
    assert s["series_uid"] == series[0].series_uid
    assert app.partials() == []
    lost = app.query("SELECT COUNT(*) AS n FROM associations WHERE outcome = 'lost'")[0]["n"]
    assert lost >= 1, "the killed associations were not recorded as lost"


def test_listener_killed_alone_is_restarted(appliance_factory: Any, tmp_path: Path) -> None:
    """A listener process that dies is replaced; the appliance keeps receiving."""
    from conftest import run_echoscu, run_storescu

    app = appliance_factory()
    assert app.proc is not None
    children_file = Path(f"/proc/{app.proc.pid}/task/{app.proc.pid}/children")
    if not children_file.exists():
        pytest.skip("needs /proc/PID/task/PID/children (Linux)")

    def nice(pid: int | str) -> int:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])

    supervisor_nice = nice(app.proc.pid)

    def listener_pids() -> set[int]:
        """Spawned children at the supervisor's priority: the listeners (the inference worker renices itself)."""
        pids = set()
        for pid in children_file.read_text().split():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                same_priority = nice(pid) == supervisor_nice
            except (FileNotFoundError, ProcessLookupError):
                continue
            if (b"multiprocessing.spawn" in cmdline or b"spawn_main" in cmdline) and same_priority:
                pids.add(int(pid))
        return pids

    deadline = time.monotonic() + 10  # the worker is spawned after the listeners and renices itself at once
    while len(before := listener_pids()) != 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(before) == 2, f"expected 2 listener processes, found {before}"
    victim = min(before)
    os.kill(victim, 9)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        now = listener_pids()
        if victim not in now and len(now) == len(before):
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"listener {victim} was not replaced:\n{app.log_tail()}")
    assert "restarting it" in app.log_text()
    make_series(tmp_path / "s", 5)
    res = run_storescu(app, tmp_path / "s")
    assert res.returncode == 0, res.stdout + res.stderr
    assert list(parse_storescu(res.stdout + res.stderr).values()) == ["Success"] * 5
    assert run_echoscu(app).returncode == 0
