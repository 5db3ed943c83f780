"""Tools a model can call during a multi-turn rollout: the ``Tool`` protocol, argument
checking against the tool's JSON schema, the registry by name, and the built-in
``python`` (runs in the sandbox service), ``terminal`` (bash in a sandbox session) and
``calculator`` tools. Parsing tool calls out
of model text and rendering them into prompts lives in ``rlpost.envs``."""

from rlpost.tools.base import TOOL_FACTORIES, Tool, check_arguments, make_tool, register_tool, tool_schema
from rlpost.tools.calculator import CalculationError, CalculatorTool, calculate
from rlpost.tools.python import PythonTool, format_result
from rlpost.tools.terminal import TerminalTool

__all__ = [
    "TOOL_FACTORIES",
    "CalculationError",
    "CalculatorTool",
    "PythonTool",
    "TerminalTool",
    "Tool",
    "calculate",
    "check_arguments",
    "format_result",
    "make_tool",
    "register_tool",
    "tool_schema",
]
