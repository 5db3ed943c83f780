"""``python -m rlpost.sandbox serve --host 127.0.0.1 --port 8900``: run the sandbox service.

The token comes from ``RLPOST_SANDBOX_TOKEN`` or ``--token-file``, never from the command
line, where every user of the host could read it in ``ps``."""

from __future__ import annotations

import argparse
import os
import sys

from rlpost.errors import SandboxError
from rlpost.sandbox.runner import BASE_UID
from rlpost.sandbox.server import serve
from rlpost.sandbox.types import TOKEN_ENV, Limits


def build_parser() -> argparse.ArgumentParser:
    defaults = Limits()
    parser = argparse.ArgumentParser(prog="python -m rlpost.sandbox", description="Code sandbox service")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="serve POST /run, sessions, GET /health and /metrics")
    p.add_argument("--host", default="127.0.0.1", help="bind address; beyond loopback (e.g. 0.0.0.0) a token is required")
    p.add_argument("--port", type=int, default=8900, help="0 picks a free port and prints it")
    p.add_argument("--max-concurrency", type=int, default=defaults.max_concurrency)
    p.add_argument("--max-queue", type=int, default=32,
                   help="requests that may wait for a slot (FIFO); beyond it the answer is 429. 0: never wait")
    p.add_argument("--max-queue-wait-s", type=float, default=30.0,
                   help="longest wait for a slot (never past the request's own timeout_s); then 429")
    p.add_argument("--token-file", default=None,
                   help=f"file holding the bearer token clients must send (default: ${TOKEN_ENV}, if set)")
    p.add_argument("--max-timeout-s", type=float, default=defaults.max_timeout_s)
    p.add_argument("--max-memory-mb", type=int, default=defaults.max_memory_mb)
    p.add_argument("--output-limit-kb", type=int, default=defaults.output_limit_bytes // 1024)
    p.add_argument("--max-processes", type=int, default=defaults.max_processes)
    p.add_argument("--disk-mb", type=int, default=defaults.disk_mb)
    p.add_argument("--max-sessions", type=int, default=defaults.max_sessions,
                   help="live sessions allowed at once; beyond it POST /sessions is answered 429")
    p.add_argument("--session-idle-s", type=float, default=defaults.session_idle_s,
                   help="a session unused this long is deleted with its workspace")
    p.add_argument("--max-upload-kb", type=int, default=defaults.max_upload_bytes // 1024,
                   help="total size of the files uploaded into a session at creation")
    p.add_argument("--advertise-url", default=None,
                   help="this server's own URL, sent with each new session so its calls bypass a load balancer "
                        "(e.g. http://POD_IP:8900); default: the URL the client used")
    p.add_argument("--python", default=None, help="interpreter inside the sandbox (default /usr/bin/python3)")
    p.add_argument("--base-uid", type=int, default=BASE_UID,
                   help="slot k runs as uid base+k when serving as root; give each server on a host its own range")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    limits = Limits(
        max_concurrency=args.max_concurrency,
        max_timeout_s=args.max_timeout_s,
        max_memory_mb=args.max_memory_mb,
        output_limit_bytes=args.output_limit_kb * 1024,
        max_processes=args.max_processes,
        disk_mb=args.disk_mb,
        max_sessions=args.max_sessions,
        session_idle_s=args.session_idle_s,
        max_upload_bytes=args.max_upload_kb * 1024,
    )
    try:
        token = read_token(args.token_file)
        serve(args.host, args.port, limits, args.python, args.base_uid, max_queue=args.max_queue,
              max_queue_wait_s=args.max_queue_wait_s, token=token, advertise_url=args.advertise_url)
    except SandboxError as e:
        sys.exit(f"rlpost.sandbox: {e}")


def read_token(path: str | None) -> str | None:
    if path is None:
        return os.environ.get(TOKEN_ENV) or None
    try:
        token = open(path).read().strip()
    except OSError as e:
        raise SandboxError(f"cannot read --token-file {path}: {e}") from e
    if not token:
        raise SandboxError(f"--token-file {path} is empty")
    return token


if __name__ == "__main__":
    main()
