"""Run the gateway in this process: uvicorn in a background thread, so a driver (or a
test) starts it, hands ``url`` to agent code and stops it."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn

from rlpost.gateway.app import build_app
from rlpost.gateway.config import GatewayConfig
from rlpost.gateway.service import GatewayService
from rlpost.gateway.session import SessionSample
from rlpost.groups import RolloutGroupLike


class GatewayServer:
    """``with GatewayServer(rollout, tokenizer, cfg) as gw:`` serves at ``gw.url``
    until the block ends. ``new_session()`` gives ``(session id, base_url)`` for an
    ``openai.OpenAI(base_url=...)``; ``export(id)`` its token record."""

    def __init__(self, rollout: RolloutGroupLike, tokenizer: Any, cfg: GatewayConfig | None = None):
        self.cfg = cfg or GatewayConfig()
        self.service = GatewayService(rollout, tokenizer, self.cfg)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def start(self, timeout_s: float = 30.0) -> GatewayServer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.cfg.host, self.cfg.port))  # port 0: the OS picks a free one, no race
        port = sock.getsockname()[1]
        config = uvicorn.Config(build_app(self.service), log_level="warning", access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name="rlpost-gateway", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not start on {self.cfg.host}:{port}")
            time.sleep(0.01)
        self.url = f"http://{self.cfg.host}:{port}"
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=30)
        self._server = self._thread = None

    def __enter__(self) -> GatewayServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def new_session(self) -> tuple[str, str]:
        session = self.service.create_session()
        return session.id, f"{self.url}/sessions/{session.id}/v1"

    def export(self, session_id: str) -> list[SessionSample]:
        return self.service.export(session_id)
