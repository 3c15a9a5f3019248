"""The ``appliance`` command: one subcommand per thing an operator does."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import datetime
from typing import TYPE_CHECKING, Any

from appliance import __version__, logs
from appliance.config import DEFAULT_CONFIG_NAME, Config, load_config
from appliance.errors import ApplianceError, ResultsError
from appliance.store.states import OutboxState

if TYPE_CHECKING:  # measure pulls numpy and scipy: imported where a command needs it
    from appliance.infer.measure import Lesion

log = logging.getLogger("appliance")

_CONFIG_HELP = (
    f"configuration file (default: $APPLIANCE_CONFIG if set, else ./{DEFAULT_CONFIG_NAME} if present, "
    "else built-in defaults)"
)


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts).astimezone().isoformat(timespec="milliseconds")


def cmd_serve(cfg: Config, args: argparse.Namespace) -> int:
    from appliance.service import serve

    return serve(cfg)


def cmd_status(cfg: Config, args: argparse.Namespace) -> int:
    from appliance.status import NotRunningError, read_snapshot

    try:
        snap = read_snapshot(cfg.storage.data_dir)
    except NotRunningError as exc:
        if args.json:
            print(json.dumps({"running": False, "reason": str(exc)}))
        else:
            print(f"not running: {exc}")
        return 3  # as systemctl status does for a stopped unit
    if args.json:
        print(json.dumps({"running": True, **snap.as_dict()}, indent=2))
        return 0
    print(f"appliance {snap.version} running (pid {snap.pid}) since {_iso(snap.started)}")
    print(f"open associations: {snap.open_associations} of max_associations={snap.max_associations}")
    for ls in snap.listeners:
        state = "alive" if ls.alive else "DEAD (being restarted)"
        print(f"  listener {ls.slot}: pid {ls.pid} {state}, {ls.open_associations} open")
    print(f"inference worker: pid {snap.worker_pid} {'alive' if snap.worker_alive else 'NOT RUNNING'}")
    return 0


def cmd_series(cfg: Config, args: argparse.Namespace) -> int:
    from appliance.store import Store

    store = Store.open(cfg.storage.data_dir, create=False)
    rows = store.index.list_series()
    out: list[dict[str, Any]] = [
        {
            "study_uid": r["study_uid"],
            "series_uid": r["series_uid"],
            "modality": r["modality"],
            "description": r["description"],
            "instances": r["instances"],
            "bytes": r["bytes"],
            "state": r["state"],
            "state_reason": r["state_reason"],
            "first_received": _iso(r["first_received"]),
            "last_received": _iso(r["last_received"]),
        }
        for r in rows
    ]
    if args.json:
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    if not out:
        print(f"no series received yet (data in {store.data_dir})")
        return 0
    cols = [
        ("state", 13),
        ("modality", 4),
        ("instances", 9),
        ("last_received", 23),
        ("series_uid", 64),
        ("description", 30),
    ]
    print("  ".join(name.upper().ljust(w) for name, w in cols).rstrip())
    for r in out:
        print("  ".join(str(r[name] if r[name] is not None else "-")[:64].ljust(w) for name, w in cols).rstrip())
    print(f"{len(out)} series, {sum(r['instances'] for r in out)} instances")
    return 0


def cmd_check_config(cfg: Config, args: argparse.Namespace) -> int:
    where = cfg.source or "built-in defaults"
    print(f"configuration OK ({where})")
    print(json.dumps(cfg.model_dump(mode="json"), indent=2))
    return 0


def _backends_here() -> dict[str, str]:
    """Which backends can run here, and if not, why (for ``models list``)."""
    out = {}
    try:
        import onnxruntime  # noqa: F401

        out["onnxruntime"] = "available (CPU)"
    except ImportError as exc:
        out["onnxruntime"] = f"unavailable: {exc}"
    from appliance.errors import BackendUnavailable
    from appliance.infer.backends.tensorrt import gpu_info, trt_flavour

    try:
        flavour = trt_flavour()
        gpu = gpu_info()
        out["tensorrt"] = f"available ({flavour.name} {flavour.version} on {gpu.device})"
    except BackendUnavailable as exc:
        out["tensorrt"] = f"unavailable: {exc}"
    return out


def cmd_models_list(cfg: Config, args: argparse.Namespace) -> int:
    from appliance.models.package import find_packages

    models_dir = cfg.inference.resolved_models_dir()
    packages, refused = find_packages(models_dir)
    backends = _backends_here()
    rows: list[dict[str, Any]] = [
        {
            "name": p.name,
            "version": p.version,
            "task": p.manifest.task,
            "modality": p.manifest.modality,
            "labels": {str(lab.value): lab.name for lab in p.labels},
            "path": str(p.path),
            "onnx_sha256": p.onnx_sha256,
            "backends": {k: v.startswith("available") for k, v in backends.items()},
        }
        for p in packages
    ]
    if args.json:
        json.dump(
            {"models_dir": str(models_dir), "models": rows, "refused": refused, "backends": backends},
            sys.stdout,
            indent=2,
        )
        sys.stdout.write("\n")
        return 0
    print(f"models in {models_dir}:")
    for r in rows:
        here = ", ".join(k for k, ok in r["backends"].items() if ok)
        print(f"  {r['name']:<24} {r['version']:<10} {r['task']:<13} {r['modality']:<4} backends here: {here}")
    for name, why in refused.items():
        print(f"  {name:<24} REFUSED: {why}")
    if not rows and not refused:
        print("  (none)")
    for k, v in backends.items():
        print(f"backend {k}: {v}")
    return 0


def cmd_models_verify(cfg: Config, args: argparse.Namespace) -> int:
    from appliance.infer.backends.onnxruntime import OnnxRuntimeBackend
    from appliance.models.package import installed_package

    pkg = installed_package(cfg.inference.resolved_models_dir(), args.name)
    OnnxRuntimeBackend(pkg, threads=1)  # the ONNX loads and its tensor names match the manifest
    print(
        f"{pkg.name} {pkg.version}: OK ({len(pkg.manifest.files)} files match their SHA-256; "
        f"model.onnx loads in ONNX Runtime)"
    )
    return 0


def cmd_models_build_engines(cfg: Config, args: argparse.Namespace) -> int:
    from appliance.infer.backends.tensorrt import build_engine
    from appliance.models.package import find_packages, installed_package

    models_dir = cfg.inference.resolved_models_dir()
    if args.name:
        packages = [installed_package(models_dir, n) for n in args.name]
    else:
        packages, refused = find_packages(models_dir)
        for name, why in refused.items():
            print(f"{name}: skipped, package refused: {why}", file=sys.stderr)
    from appliance.infer.backends.tensorrt import read_sidecar

    engines = cfg.storage.data_dir / "engines"
    failed = 0
    for pkg in packages:
        print(f"{pkg.name}: building {cfg.inference.precision} engine (this can take minutes)...", file=sys.stderr)
        try:
            path, built = build_engine(pkg, cfg.inference.precision, engines)
        except ApplianceError as exc:  # EngineBuildError, ModelPackageError, BackendUnavailable
            print(f"{pkg.name}: FAILED: {exc}", file=sys.stderr)
            failed += 1
            continue
        info = read_sidecar(path) or {}
        took = f", built in {info['build_seconds']:.1f} s" if built and "build_seconds" in info else ""
        print(f"{pkg.name}: {'built' if built else 'cached'} {path} ({path.stat().st_size / 1e6:.1f} MB{took})")
    return 2 if failed else 0


def cmd_infer(cfg: Config, args: argparse.Namespace) -> int:
    from pathlib import Path

    from appliance.infer.backends import open_backend
    from appliance.infer.pipeline import limit_heap_retention, run_series, write_outputs
    from appliance.infer.series_files import find_series
    from appliance.models.package import installed_package
    from appliance.results import build_results

    limit_heap_retention()  # as the worker: freed slab buffers leave the process, the peak follows the budget
    pkg = installed_package(cfg.inference.resolved_models_dir(), args.model)
    files = find_series(Path(args.input_dir), args.series)
    backend = open_backend(
        pkg,
        args.backend or cfg.inference.backend,
        cfg.inference.precision,
        cfg.storage.data_dir / "engines",
        cfg.inference.threads,
    )
    print(
        f"{len(files)} instances; model {pkg.name} {pkg.version} on {backend.name} ({backend.device}, "
        f"{backend.precision})",
        file=sys.stderr,
    )
    shown: dict[str, int] = {}

    def progress(stage: str, i: int, n: int) -> None:
        pct = 100 * i // n
        if i == n or pct >= shown.get(stage, -100) + 10:
            shown[stage] = pct
            print(f"  {stage}: {i}/{n}", file=sys.stderr)

    result = run_series(
        files, pkg, backend, progress if not args.quiet else None, memory_budget_mb=cfg.inference.memory_budget_mb
    )
    out = Path(args.out)
    write_outputs(result, out)
    made = []
    if not args.no_dicom:
        try:
            made = build_results(result, pkg, out)
        except ResultsError as exc:
            # The label map and summary stand on their own; a source the DICOM objects cannot reference
            # (e.g. an anonymiser blanked its UIDs) must not hide them.
            print(f"appliance infer: warning: DICOM results not written: {exc}", file=sys.stderr)
    s = result.summary
    m = s.measurements
    organs = ", ".join(f"{o.name} {o.volume_ml:.1f} mL" for o in m.organs)
    files_made = ", ".join(["labelmap.npz", "summary.json", *(o.filename for o in made)])
    threshold = (
        f"under {m.min_lesion_diameter_mm:g} mm"
        + (f" or under {m.min_confidence:g} confidence" if m.min_confidence else "")
        + (" or rims along the organ's edge" if m.max_edge_contact < 1.0 else "")
        + (f" or scoring under {m.min_finding_score:g}" if m.min_finding_score else "")
    )
    print(
        f"{out}: {files_made}: {organs}; {m.lesion_count} lesion finding(s)"
        + (f" ({m.unreported_lesions} {threshold} not reported)" if m.unreported_lesions else "")
        + "; "
        + ", ".join(f"{k} {v:.2f}s" for k, v in s.timings_s.items())
    )
    for les in sorted(m.lesions, key=lambda x: x.index)[:20]:
        print("  " + _finding_line(les))
    if m.lesion_count > 20:
        print(f"  ... and {m.lesion_count - 20} more (summary.json lists them all)")
    return 0


def _finding_line(les: Lesion) -> str:
    """One finding as a reader says it: size first, then where it is and what it looks like."""
    parts = [
        f"finding {les.index}: {les.longest_axial_diameter_mm:.1f} x {les.short_axis_mm:.1f} mm",
        f"{les.volume_ml:.2f} mL",
        f"slice {les.slice_index + 1}",
    ]
    if les.octant:
        parts.append(les.octant)
    if les.attenuation:
        parts.append(f"{les.attenuation}-attenuating ({les.mean_hu:.0f} HU against {les.surrounding_hu:.0f})")
    if les.confidence is not None:
        parts.append(f"confidence {les.confidence:.2f}")
    return ", ".join(parts)


def _outbox(cfg: Config) -> Any:
    from appliance.store import Store
    from appliance.store.outbox import Outbox

    return Outbox(Store.open(cfg.storage.data_dir, create=False).index)


def cmd_outbox_list(cfg: Config, args: argparse.Namespace) -> int:
    rows = _outbox(cfg).list(state=args.state, series_uid=args.series)
    for r in rows:
        for k in ("next_attempt_at", "created_at", "sent_at"):
            r[k] = _iso(r[k])
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    if not rows:
        print("the outbox is empty" + (f" (state {args.state})" if args.state else ""))
        return 0
    cols = [
        ("id", 6),
        ("state", 10),
        ("destination", 12),
        ("kind", 4),
        ("attempts", 8),
        ("model", 16),
        ("series_uid", 40),
        ("last_error", 80),
    ]
    print("  ".join(name.upper().ljust(w) for name, w in cols).rstrip())
    for r in rows:
        print(
            "  ".join(
                str(r[name] if r[name] is not None else "-")[: w if name != "last_error" else 200].ljust(w)
                for name, w in cols
            ).rstrip()
        )
    by_state: dict[str, int] = {}
    for r in rows:
        by_state[r["state"]] = by_state.get(r["state"], 0) + 1
    print(", ".join(f"{n} {k}" for k, n in sorted(by_state.items())))
    return 0


def cmd_outbox_retry(cfg: Config, args: argparse.Namespace) -> int:
    if not args.ids and not args.all_dead:
        print("appliance outbox retry: name the outbox ids to retry, or --all-dead", file=sys.stderr)
        return 2
    n = _outbox(cfg).retry(args.ids, all_dead=args.all_dead)
    print(f"{n} dead letter(s) queued again; a running appliance sends them within seconds")
    return 0 if n or args.all_dead else 1


def _read_password(name: str) -> str:
    """From the terminal (asked twice, not echoed) or, when stdin is not a terminal, two lines of stdin."""
    import getpass

    if sys.stdin.isatty():
        first = getpass.getpass(f"password for {name}: ")
        second = getpass.getpass("again: ")
    else:
        first = sys.stdin.readline().rstrip("\r\n")
        second = sys.stdin.readline().rstrip("\r\n")
    if first != second:
        from appliance.store.users import UserError

        raise UserError("the two passwords differ; nothing was changed")
    return first


def _users(cfg: Config) -> Any:
    from appliance.store import Store
    from appliance.store.users import Users

    return Users(Store.open(cfg.storage.data_dir).index)


def _audit_cli(cfg: Config, action: str, target: str, detail: str | None = None) -> None:
    import getpass

    from appliance.store import Store
    from appliance.store.users import Audit

    try:
        who = f"{getpass.getuser()} (shell)"
    except (KeyError, OSError):
        who = "shell"
    Audit(Store.open(cfg.storage.data_dir).index).record(
        action, username=who, address="local", target=target, detail=detail
    )


def cmd_users_add(cfg: Config, args: argparse.Namespace) -> int:
    from appliance.store.users import check_name, check_role

    check_name(args.name)
    check_role(args.role)
    u = _users(cfg).add(args.name, args.role, _read_password(args.name), args.language)
    _audit_cli(cfg, "user_add", u.name, f"role={u.role}")
    print(f"user {u.name} added with role {u.role}; log in at the panel (port {cfg.panel.port})")
    return 0


def cmd_users_list(cfg: Config, args: argparse.Namespace) -> int:
    users = _users(cfg)
    rows = users.list()
    if args.json:
        print(
            json.dumps([{"name": u.name, "role": u.role, "language": u.language, "disabled": u.disabled} for u in rows])
        )
        return 0
    for u in rows:
        print(f"{u.name:24} {u.role:11} {'disabled' if u.disabled else 'active':9} {u.language or 'browser'}")
    for lk in users.lockouts():
        print(f"locked {lk['kind']} {lk['key']} until {_iso(lk['until'])}")
    if not rows:
        print("no users: add the first admin with 'appliance users add NAME --role admin'")
    return 0


def cmd_users_passwd(cfg: Config, args: argparse.Namespace) -> int:
    _users(cfg).update(args.name, password=_read_password(args.name))
    _audit_cli(cfg, "user_change", args.name, "password reset")
    print(f"password of {args.name} changed")
    return 0


def cmd_users_set(cfg: Config, args: argparse.Namespace) -> int:
    disabled = True if args.disable else False if args.enable else None
    language: Any = False if args.language is None else (None if args.language == "browser" else args.language)
    _users(cfg).update(args.name, role=args.role, disabled=disabled, language=language)
    _audit_cli(cfg, "user_change", args.name, f"role={args.role} disabled={disabled} language={args.language}")
    print(f"user {args.name} changed")
    return 0


def cmd_users_remove(cfg: Config, args: argparse.Namespace) -> int:
    _users(cfg).remove(args.name)
    _audit_cli(cfg, "user_remove", args.name)
    print(f"user {args.name} removed")
    return 0


def cmd_users_unlock(cfg: Config, args: argparse.Namespace) -> int:
    kind, key = ("address", args.address) if args.address else ("account", args.name)
    if not key:
        print("appliance users unlock: name the account, or --address ADDR", file=sys.stderr)
        return 2
    if _users(cfg).unlock(kind, key):
        _audit_cli(cfg, "unlock", f"{kind}:{key}")
        print(f"{kind} {key} unlocked")
        return 0
    print(f"{kind} {key} was not locked")
    return 1


def cmd_panel(cfg: Config, args: argparse.Namespace) -> int:
    from appliance.panel.server import PanelServer
    from appliance.store import Store

    if args.port:
        cfg.panel.port = args.port
    server = PanelServer(cfg, Store.open(cfg.storage.data_dir))
    try:
        server.serve_forever()
    finally:
        server.stop()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="appliance",
        description="Edge inference appliance: receives DICOM, runs AI models, sends results to PACS.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "serve",
        help="run the appliance (DICOM receiver and all stages) until SIGTERM",
        description="Run the DICOM C-ECHO/C-STORE receiver and the pipeline stages. "
        "Stops cleanly on SIGTERM or Ctrl-C.",
    )
    p.add_argument("--config", metavar="PATH", help=_CONFIG_HELP)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "status",
        help="is the appliance running, and how many associations are open",
        description="Show the running appliance's processes and its open DICOM associations "
        "(across all listener processes). Exit status 3 when it is not running.",
    )
    p.add_argument("--config", metavar="PATH", help=_CONFIG_HELP)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "series",
        help="list received series and their state",
        description="List every series in the store with its state "
        "(receiving, complete, ...), instance count and receive times.",
    )
    p.add_argument("--config", metavar="PATH", help=_CONFIG_HELP)
    p.add_argument("--json", action="store_true", help="print a JSON array instead of a table")
    p.set_defaults(func=cmd_series)

    p = sub.add_parser(
        "check-config",
        help="validate a configuration file and print the effective settings",
        description="Validate the configuration and print it with all defaults filled in.",
    )
    p.add_argument("--config", metavar="PATH", help=_CONFIG_HELP)
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser(
        "models",
        help="list, verify and prepare model packages",
        description="Model packages live in [inference] models_dir (default: the bundled models/).",
    )
    msub = p.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    q = msub.add_parser(
        "list",
        help="installed packages and the backends available here",
        description="List valid model packages (name, version, task, backends available here) "
        "and any refused package with the reason.",
    )
    q.add_argument("--config", metavar="PATH", help=_CONFIG_HELP)
    q.add_argument("--json", action="store_true", help="print JSON instead of a table")
    q.set_defaults(func=cmd_models_list)
    q = msub.add_parser(
        "verify",
        help="check a package's manifest and checksums and load its model",
        description="Validate manifest.toml, check every file against its SHA-256 and load "
        "model.onnx in ONNX Runtime. Exit status 2 with the reason if anything is wrong.",
    )
    q.add_argument("name", help="package name (folder under models_dir)")
    q.add_argument("--config", metavar="PATH", help=_CONFIG_HELP)
    q.set_defaults(func=cmd_models_verify)
    q = msub.add_parser(
        "build-engines",
        help="build TensorRT engines ahead of time",
        description="Build (or find cached) TensorRT engines under <data_dir>/engines for every "
        "package, or the ones named, at [inference] precision.",
    )
    q.add_argument("name", nargs="*", help="package names (default: all)")
    q.add_argument("--config", metavar="PATH", help=_CONFIG_HELP)
    q.set_defaults(func=cmd_models_build_engines)

    p = sub.add_parser(
        "infer",
        help="run one series from files through a model, offline",
        description="Run the series in INPUT_DIR (DICOM files, searched recursively) through "
        "MODEL with exactly the worker's code, and write OUT/labelmap.npz (labels "
        "uint8 (slices, rows, cols), sop_instance_uids), OUT/summary.json and the "
        "DICOM results a PACS would receive (seg.dcm, sr.dcm, sc-1.dcm) with PNG "
        "previews.",
    )
    p.add_argument("input_dir", metavar="INPUT_DIR", help="folder with the series' DICOM files")
    p.add_argument("--model", required=True, help="model package name, e.g. liver-ct-demo")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--series", metavar="UID", help="SeriesInstanceUID to use when INPUT_DIR holds several")
    p.add_argument("--backend", choices=["auto", "onnxruntime", "tensorrt"], help="override [inference] backend")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--no-dicom", action="store_true", help="write only labelmap.npz and summary.json")
    p.add_argument("--config", metavar="PATH", help=_CONFIG_HELP)
    p.set_defaults(func=cmd_infer)

    p = sub.add_parser(
        "outbox",
        help="result objects waiting for, delivered to or refused by destinations",
        description="Every result object x destination is an outbox row: pending (being sent, "
        "retried with backoff), sent, dead (gave up after [export] max_attempts) or "
        "superseded (the series changed before it was sent).",
    )
    osub = p.add_subparsers(dest="outbox_command", metavar="ACTION", required=True)
    q = osub.add_parser(
        "list",
        help="list outbox rows with their state, attempts and last error",
        description="List outbox rows, oldest first, with the last error of each.",
    )
    q.add_argument("--state", choices=[str(s) for s in OutboxState], help="only rows in this state")
    q.add_argument("--series", metavar="UID", help="only rows of this source series")
    q.add_argument("--json", action="store_true", help="print a JSON array instead of a table")
    q.add_argument("--config", metavar="PATH", help=_CONFIG_HELP)
    q.set_defaults(func=cmd_outbox_list)
    q = osub.add_parser(
        "retry",
        help="send dead letters again",
        description="Queue dead outbox rows again with a fresh attempt count; the running "
        "appliance sends them at once. Exit status 1 when none of the ids was dead.",
    )
    q.add_argument("ids", nargs="*", type=int, metavar="ID", help="outbox ids (see `appliance outbox list`)")
    q.add_argument("--all-dead", action="store_true", help="every dead row")
    q.add_argument("--config", metavar="PATH", help=_CONFIG_HELP)
    q.set_defaults(func=cmd_outbox_retry)
    p = sub.add_parser(
        "fleet",
        help="what a vendor loads into their own monitoring (Prometheus rules, tests, Grafana dashboards)",
        description="Files for monitoring a fleet of appliances with Prometheus and Grafana.",
    )
    fsub = p.add_subparsers(dest="fleet_command", metavar="ACTION", required=True)
    q = fsub.add_parser(
        "kit",
        help="write alerting/recording rules, their promtool tests, dashboards and Prometheus examples",
        description="Write the fleet kit into DIR: appliance.rules.yml (alerts with severity and a runbook line, "
        "recording rules), appliance.rules.test.yml (promtool test rules), dashboards/ (Grafana, one box and "
        "the fleet), prometheus/ (scraping with site/device labels, agent mode with remote_write, federation).",
    )
    q.add_argument("dir", metavar="DIR", help="folder to write (created)")
    q.add_argument(
        "--clinic-hours",
        default="7-19",
        metavar="FROM-TO",
        help="UTC hours in which receiving nothing for 2 h is an alert (default 7-19)",
    )
    q.add_argument(
        "--time-to-result-target",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="p95 of last instance to results at PACS above this is an alert (default 600)",
    )
    q.add_argument("--config", metavar="PATH", help=_CONFIG_HELP)
    q.set_defaults(func=cmd_fleet_kit)

    p = sub.add_parser(
        "users",
        help="panel accounts: add, list, change, remove, unlock",
        description="Accounts of the technician panel. None ships: add the first admin here. Passwords are "
        "asked at the terminal, or read from stdin (two lines, the password twice) when it is not one.",
    )
    usub = p.add_subparsers(dest="users_command", metavar="ACTION", required=True)
    from appliance.store.users import LANGUAGES, ROLES

    q = usub.add_parser("add", help="add a user", description="Add a panel user; the password is asked twice.")
    q.add_argument("name", help="user name (letters, digits, '.', '_', '-')")
    q.add_argument(
        "--role",
        required=True,
        choices=ROLES,
        help="admin: users and all actions; technician: retry and suspend; viewer: read only",
    )
    q.add_argument("--language", choices=LANGUAGES, help="panel language (default: the browser's)")
    q.add_argument("--config", metavar="PATH", help=_CONFIG_HELP)
    q.set_defaults(func=cmd_users_add)
    q = usub.add_parser("list", help="list users and current lockouts", description="List panel users and lockouts.")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.add_argument("--config", metavar="PATH", help=_CONFIG_HELP)
    q.set_defaults(func=cmd_users_list)
    q = usub.add_parser("passwd", help="set a user's password", description="Set a user's password (asked twice).")
    q.add_argument("name")
    q.add_argument("--config", metavar="PATH", help=_CONFIG_HELP)
    q.set_defaults(func=cmd_users_passwd)
    q = usub.add_parser("set", help="change a user's role, language or status", description="Change a panel user.")
    q.add_argument("name")
    q.add_argument("--role", choices=ROLES)
    q.add_argument("--language", choices=(*LANGUAGES, "browser"))
    g = q.add_mutually_exclusive_group()
    g.add_argument("--disable", action="store_true", help="refuse this user's logins and end their sessions")
    g.add_argument("--enable", action="store_true")
    q.add_argument("--config", metavar="PATH", help=_CONFIG_HELP)
    q.set_defaults(func=cmd_users_set)
    q = usub.add_parser("remove", help="remove a user", description="Remove a panel user (never the last admin).")
    q.add_argument("name")
    q.add_argument("--config", metavar="PATH", help=_CONFIG_HELP)
    q.set_defaults(func=cmd_users_remove)
    q = usub.add_parser(
        "unlock", help="lift a login lockout", description="Lift the lockout of an account, or of an address."
    )
    q.add_argument("name", nargs="?", help="the locked account")
    q.add_argument("--address", help="the locked client address instead")
    q.add_argument("--config", metavar="PATH", help=_CONFIG_HELP)
    q.set_defaults(func=cmd_users_unlock)

    p = sub.add_parser(
        "panel",
        help="run the technician panel alone (appliance serve runs it too)",
        description="Serve the technician panel from this data directory without the DICOM receiver and stages "
        "(it then cannot see their processes; health shows as unknown).",
    )
    p.add_argument("--port", type=int, help="override [panel] port")
    p.add_argument("--config", metavar="PATH", help=_CONFIG_HELP)
    p.set_defaults(func=cmd_panel)

    return parser


def cmd_fleet_kit(cfg: Config, args: argparse.Namespace) -> int:
    from pathlib import Path

    from appliance.metrics.kit import KitOptions, write_kit

    try:
        lo, hi = (int(x) for x in args.clinic_hours.split("-"))
        if not 0 <= lo < hi <= 24:
            raise ValueError
    except ValueError:
        print(
            f"appliance fleet kit: --clinic-hours must be FROM-TO in whole hours (UTC), e.g. 7-19, not "
            f"{args.clinic_hours!r}",
            file=sys.stderr,
        )
        return 2
    opts = KitOptions(clinic_hours=(lo, hi), time_to_result_target_seconds=args.time_to_result_target)
    out = Path(args.dir)
    files = write_kit(out, opts)
    print(f"fleet kit for appliance {__version__} in {out}: " + ", ".join(str(f.relative_to(out)) for f in files))
    print(
        f"check it: cd {out} && promtool check rules appliance.rules.yml && promtool test rules "
        "appliance.rules.test.yml && promtool check config prometheus/scrape.yml"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from appliance.store.perms import restrict_umask

    restrict_umask()  # whatever a command writes under data_dir (engines, retries) stays private
    try:
        cfg = load_config(args.config)
        logs.setup(cfg.logging.level)
        return int(args.func(cfg, args) or 0)
    except ApplianceError as exc:
        print(f"appliance {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
