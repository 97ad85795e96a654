"""Command line: `gatewise run | check | doctor | demo | faults`.

Exit codes: 0 success, 1 invalid configuration (one line per problem, naming the key),
2 usage errors (argparse's convention).
"""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_CONFIG = "conf/gatewise.toml"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gatewise", description="A reverse proxy that explains its errors.")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the proxy")
    run.add_argument("-c", "--config", help=f"TOML config (default: {DEFAULT_CONFIG} when present)")
    run.add_argument("--to", action="append", metavar="URL",
                     help="no config file: proxy to these servers (repeatable; URL#weight=N)")
    run.add_argument("--listen", metavar="H:P", help="override listen.address")
    run.add_argument("--admin", metavar="H:P", help="override admin.address")
    run.add_argument("--workers", type=int, help="override listen.workers")

    check = sub.add_parser("check", help="validate a config file")
    check.add_argument("-c", "--config", default=None, help=f"TOML config (default: {DEFAULT_CONFIG})")

    doctor = sub.add_parser("doctor", help="diagnose every upstream server (the 502 checklist)")
    doctor.add_argument("-c", "--config", default=None, help=f"TOML config (default: {DEFAULT_CONFIG})")
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")

    demo = sub.add_parser("demo", help="a proxy with built-in demo upstreams, to try things")
    demo.add_argument("--listen", default="127.0.0.1:8080", metavar="H:P")
    demo.add_argument("--admin", default="127.0.0.1:9901", metavar="H:P")

    faults = sub.add_parser("faults", help="run a fault-injecting upstream")
    faults.add_argument("--listen", default="127.0.0.1:9001", metavar="H:P")
    faults.add_argument("--mode", default="ok", help="ok, refuse, blackhole, hang, slow:S, reset, close, "
                        "garbage, tls, truncate, stall, huge-header, status:CODE, flaky:P")
    return p


def _load(args: argparse.Namespace):
    from proxy.config import ConfigError, config_from_urls, load_config

    try:
        if getattr(args, "to", None):
            if args.config:
                raise ConfigError(["--to and -c cannot be combined"])
            return config_from_urls(args.to, listen=args.listen, admin=args.admin, workers=args.workers)
        path = args.config or DEFAULT_CONFIG
        if not args.config and not os.path.exists(path):
            raise ConfigError([f"no config: pass -c FILE or --to URL ({DEFAULT_CONFIG} not found)"])
        return load_config(path, listen=getattr(args, "listen", None),
                           admin=getattr(args, "admin", None), workers=getattr(args, "workers", None))
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check":
        cfg = _load(args)
        if cfg is None:
            return 1
        print(f"{args.config or DEFAULT_CONFIG}: ok ({len(cfg.pools)} pools, {len(cfg.routes)} routes)")
        return 0
    if args.command == "run":
        cfg = _load(args)
        if cfg is None:
            return 1
        from proxy.config import load_config
        from proxy.lifecycle import run_forever

        path = args.config or DEFAULT_CONFIG

        def reload_config():  # SIGHUP re-reads the same file, with the same command-line overrides
            return load_config(path, listen=args.listen, admin=args.admin, workers=args.workers)

        return run_forever(cfg, None if args.to else reload_config)
    if args.command == "doctor":
        cfg = _load(args)
        if cfg is None:
            return 1
        from diagnostics.doctor import main_doctor

        return main_doctor(cfg, as_json=args.json)
    if args.command == "demo":
        from proxy.demo import main_demo

        return main_demo(listen=args.listen, admin=args.admin)
    if args.command == "faults":
        from diagnostics.faults import main_faults

        return main_faults(args.listen, args.mode)
    raise AssertionError(args.command)
