"""The gateway's typed settings, validated once on construction."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from rlpost.errors import ConfigError


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class GatewayConfig:
    """``host``/``port``: where to listen (port 0: a free port, read it from
    ``GatewayServer.url``). ``api_key``: the bearer token every request must carry;
    required when ``host`` is not loopback (anyone who can reach the port could
    otherwise sample from, and write training data into, the run), optional on loopback.
    ``max_context_tokens``: prompt tokens + ``max_tokens`` allowed per request (the
    engine's context); longer requests get a 400. ``model_name``: what ``/v1/models``
    lists (clients must send some ``model``; any value is accepted).
    ``default_max_tokens``: when a chat request sets neither ``max_tokens`` nor
    ``max_completion_tokens``. ``temperature`` / ``top_p``: when set, every request
    samples with them whatever it asks for. Training sets them to the run's
    ``rollout.temperature``/``top_p`` (the trainer scores tokens at that temperature, and
    the recorded sampler log-probs must match it) and eval to greedy.
    ``max_concurrent_requests``: requests handled at once (each holds a server thread
    while it waits to be sampled); past it they wait for a thread before batching."""

    host: str = "127.0.0.1"
    port: int = 0
    api_key: str | None = None
    max_context_tokens: int = 2048
    model_name: str = "rlpost-policy"
    default_max_tokens: int = 256
    temperature: float | None = None
    top_p: float | None = None
    max_concurrent_requests: int = 512

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"gateway port must be in 0..65535 (0 = a free port), got {self.port}")
        if not is_loopback(self.host) and not self.api_key:
            raise ConfigError(f"the gateway binds {self.host!r}, beyond loopback: set api_key (a bearer token "
                              "clients send as their OpenAI api_key), or bind 127.0.0.1")
        if self.max_context_tokens < 2:
            raise ConfigError(f"gateway max_context_tokens must be >= 2, got {self.max_context_tokens}")
        if self.default_max_tokens < 1:
            raise ConfigError(f"gateway default_max_tokens must be >= 1, got {self.default_max_tokens}")
        if self.max_concurrent_requests < 1:
            raise ConfigError(f"gateway max_concurrent_requests must be >= 1, got {self.max_concurrent_requests}")
        if self.temperature is not None and self.temperature < 0:
            raise ConfigError(f"gateway temperature must be >= 0 (or None: the request's), got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"gateway top_p must be in (0, 1] (or None: the request's), got {self.top_p}")
