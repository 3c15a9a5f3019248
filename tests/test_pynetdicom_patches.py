"""The pynetdicom patches apply only to the source they were written against, can be switched off, and
change no sleep but the two reactor loops' (so an abort still settles for its full 0.1 s)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

from appliance.ingest import pins


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_pins_match_the_installed_pynetdicom() -> None:
    assert pins.mismatches(pins.GUARD + pins.TUNING) == [], "pynetdicom changed: review the patches, then re-pin"


def test_a_changed_callable_is_named_and_nothing_is_patched() -> None:
    r = _run("""
        import logging, time
        logging.basicConfig(level=logging.INFO)
        from appliance.ingest import guard, pins, tuning
        import pynetdicom.dul as dul
        pins.PINNED["pynetdicom.dul:DULServiceProvider.run_reactor"] = "0" * 64  # as if pynetdicom were patched
        before = dul.DULServiceProvider.run_reactor
        assert guard.guard_pynetdicom(guard.Limits()) is False
        assert tuning.tune_pynetdicom() is False
        assert dul.DULServiceProvider.run_reactor is before and dul.time is time
        print("unpatched")
    """)
    assert r.returncode == 0, r.stderr
    assert "unpatched" in r.stdout
    assert r.stderr.count("DULServiceProvider.run_reactor") == 2, r.stderr  # both say which callable differs
    assert "PDU sizes are NOT bounded" in r.stderr and "running it unmodified" in r.stderr


def test_tuning_off_switch_leaves_pynetdicom_unmodified() -> None:
    r = _run("""
        import logging, time
        logging.basicConfig(level=logging.INFO)
        from appliance.ingest import pins, tuning
        import pynetdicom.association as association, pynetdicom.dul as dul
        assert tuning.tune_pynetdicom() is False
        assert dul.time is time and association.time is time
        assert not hasattr(dul.DULServiceProvider.send_pdu, "__wrapped__")
        print("off")
    """, APPLIANCE_PYNETDICOM_TUNING="0")
    assert r.returncode == 0, r.stderr
    assert "off" in r.stdout and "disabled by APPLIANCE_PYNETDICOM_TUNING=0" in r.stderr


def test_guard_then_tuning_both_apply_and_wrap_the_originals() -> None:
    r = _run("""
        import inspect
        from appliance.ingest import guard, pins, tuning
        import pynetdicom.dul as dul, pynetdicom.association as association
        assert guard.guard_pynetdicom(guard.Limits()) and tuning.tune_pynetdicom()
        # Wrapped originals stay reachable under the wrappers; the PDU read alone is replaced outright.
        assert pins.mismatches(pins.GUARD + pins.TUNING) == ["pynetdicom.dul:DULServiceProvider._read_pdu_data"]
        names = sorted(c.co_name for c in tuning._REACTOR_LOOPS)
        assert names == ["_run_reactor", "run_reactor"], names
        assert all("time.sleep" in inspect.getsource(inspect.unwrap(f))
                   for f in (dul.DULServiceProvider.run_reactor, association.Association._run_reactor))
        print("both")
    """)
    assert r.returncode == 0, r.stderr
    assert "both" in r.stdout


def _on_reactor_thread(fn: object) -> tuple[float, list[float]]:
    """Run ``fn`` on a thread that has a wait strategy attached, as the tuning gives reactor threads."""
    waited: list[float] = []
    took: list[float] = []

    def body() -> None:
        threading.current_thread()._edge_wait = waited.append  # type: ignore[attr-defined]  # what tuning sets
        t = time.monotonic()
        fn()  # type: ignore[operator]
        took.append(time.monotonic() - t)

    th = threading.Thread(target=body)
    th.start()
    th.join(10)
    return took[0], waited


def test_a_sleep_outside_the_reactor_loops_is_a_real_sleep() -> None:
    from appliance.ingest.tuning import _ReactorClock

    took, waited = _on_reactor_thread(lambda: _ReactorClock.sleep(0.1))  # e.g. Association.abort's settle delay
    assert waited == [] and took >= 0.1


def test_a_sleep_in_a_reactor_loop_waits_for_work(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from appliance.ingest import tuning

    def loop() -> None:
        tuning._ReactorClock.sleep(0.1)

    monkeypatch.setattr(tuning, "_REACTOR_LOOPS", frozenset({loop.__code__}))
    took, waited = _on_reactor_thread(loop)
    assert waited == [0.1] and took < 0.1
