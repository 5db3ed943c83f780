"""``python -m rlpost.sandbox serve --host 127.0.0.1 --port 8900``: run the sandbox service."""

from __future__ import annotations

import argparse

from rlpost.sandbox.runner import BASE_UID
from rlpost.sandbox.server import serve
from rlpost.sandbox.types import Limits


def main(argv: list[str] | None = None) -> None:
    defaults = Limits()
    parser = argparse.ArgumentParser(prog="python -m rlpost.sandbox", description="Code sandbox service")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="serve POST /run and GET /health")
    p.add_argument("--host", default="127.0.0.1", help="bind address; 0.0.0.0 to serve a fleet (no auth: firewall it)")
    p.add_argument("--port", type=int, default=8900, help="0 picks a free port and prints it")
    p.add_argument("--max-concurrency", type=int, default=defaults.max_concurrency)
    p.add_argument("--max-timeout-s", type=float, default=defaults.max_timeout_s)
    p.add_argument("--max-memory-mb", type=int, default=defaults.max_memory_mb)
    p.add_argument("--output-limit-kb", type=int, default=defaults.output_limit_bytes // 1024)
    p.add_argument("--max-processes", type=int, default=defaults.max_processes)
    p.add_argument("--disk-mb", type=int, default=defaults.disk_mb)
    p.add_argument("--python", default=None, help="interpreter inside the sandbox (default /usr/bin/python3)")
    p.add_argument("--base-uid", type=int, default=BASE_UID,
                   help="slot k runs as uid base+k when serving as root; give each server on a host its own range")
    args = parser.parse_args(argv)
    limits = Limits(
        max_concurrency=args.max_concurrency,
        max_timeout_s=args.max_timeout_s,
        max_memory_mb=args.max_memory_mb,
        output_limit_bytes=args.output_limit_kb * 1024,
        max_processes=args.max_processes,
        disk_mb=args.disk_mb,
    )
    serve(args.host, args.port, limits, args.python, args.base_uid)


if __name__ == "__main__":
    main()
