"""Environments for multi-turn episodes (``base`` has the protocol), the single-turn
adapter over reward functions, tool-call parsing and chat rendering."""

from rlpost.envs.base import EnvFailure, Environment, Message, StepResult, Task, env_tools, tool_schemas
from rlpost.envs.fake import FakeEnv, SyncFakeEnv
from rlpost.envs.reward_env import RewardEnv
from rlpost.envs.runner import EnvRunner, LocalEnvPool, Opening
from rlpost.envs.tool_calls import ParseError, ToolCall, parse_tool_calls, run_tool_calls

__all__ = ["EnvFailure", "Environment", "EnvRunner", "FakeEnv", "LocalEnvPool", "Message", "Opening",
           "ParseError", "RewardEnv", "StepResult", "SyncFakeEnv", "Task", "ToolCall", "env_tools",
           "parse_tool_calls", "run_tool_calls", "tool_schemas"]
