"""An OpenAI-compatible gateway in front of the rollout replicas, recording each
agent session's exact sampled tokens for training (docs/gateway.md)."""

from rlpost.gateway.config import GatewayConfig
from rlpost.gateway.server import GatewayServer
from rlpost.gateway.service import GatewayService
from rlpost.gateway.session import NOT_SAMPLED, SessionSample

__all__ = ["NOT_SAMPLED", "GatewayConfig", "GatewayServer", "GatewayService", "SessionSample"]
