"""The ``appliance`` command: one subcommand per thing an operator does."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import datetime
from typing import Any

from appliance import __version__, logs
from appliance.config import DEFAULT_CONFIG_NAME, Config, load_config
from appliance.errors import ApplianceError

log = logging.getLogger("appliance")

_CONFIG_HELP = f"configuration file (default: ./{DEFAULT_CONFIG_NAME} if present, else built-in defaults)"


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts).astimezone().isoformat(timespec="milliseconds")


def cmd_serve(cfg: Config, args: argparse.Namespace) -> int:
    from appliance.service import serve

    return serve(cfg)


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
    cols = [("state", 9), ("modality", 4), ("instances", 9), ("last_received", 23), ("series_uid", 64),
            ("description", 30)]
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="appliance",
        description="Edge inference appliance: receives DICOM, runs AI models, sends results to PACS.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("serve", help="run the appliance (DICOM receiver and all stages) until SIGTERM",
                       description="Run the DICOM C-ECHO/C-STORE receiver and the pipeline stages. "
                                   "Stops cleanly on SIGTERM or Ctrl-C.")
    p.add_argument("--config", metavar="PATH", help=_CONFIG_HELP)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("series", help="list received series and their state",
                       description="List every series in the store with its state "
                                   "(receiving, complete, ...), instance count and receive times.")
    p.add_argument("--config", metavar="PATH", help=_CONFIG_HELP)
    p.add_argument("--json", action="store_true", help="print a JSON array instead of a table")
    p.set_defaults(func=cmd_series)

    p = sub.add_parser("check-config", help="validate a configuration file and print the effective settings",
                       description="Validate the configuration and print it with all defaults filled in.")
    p.add_argument("--config", metavar="PATH", help=_CONFIG_HELP)
    p.set_defaults(func=cmd_check_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config)
        logs.setup(cfg.logging.level)
        return int(args.func(cfg, args) or 0)
    except ApplianceError as exc:
        print(f"appliance {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
