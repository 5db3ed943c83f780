"""What a tool is, how its arguments are checked, and the registry of tools by name.

A tool is an object with ``name``, ``description``, ``parameters`` (a JSON schema of
``type: object``) and ``__call__(arguments: dict) -> str``. The returned text is the
tool message the model reads next. Arguments that do not match the schema, and anything
else the *model* got wrong, come back as text starting with ``Error:`` so the model can
correct itself; infrastructure failures (``SandboxError``) are raised.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

from rlpost.errors import ConfigError

_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
}


@runtime_checkable
class Tool(Protocol):
    name: str
    description: str
    parameters: dict[str, Any]

    def __call__(self, arguments: dict[str, Any]) -> str: ...


def check_arguments(parameters: dict[str, Any], arguments: Any) -> str | None:
    """The first way ``arguments`` violates an object schema (required keys, unknown keys
    when ``additionalProperties`` is false, top-level property types), or None. Not a
    full JSON-schema validator: tools here take a few flat arguments."""
    if not isinstance(arguments, dict):
        return "arguments must be a JSON object"
    props = parameters.get("properties", {})
    missing = [k for k in parameters.get("required", []) if k not in arguments]
    if missing:
        return f"missing required argument(s) {missing}"
    if parameters.get("additionalProperties") is False:
        extra = sorted(set(arguments) - set(props))
        if extra:
            return f"unknown argument(s) {extra}; expected {sorted(props)}"
    for key, value in arguments.items():
        expected = props.get(key, {}).get("type")
        if expected in _JSON_TYPES:
            # bool is an int in Python but not a JSON number.
            if not isinstance(value, _JSON_TYPES[expected]) or (isinstance(value, bool) and expected != "boolean"):
                return f"argument {key!r} must be of type {expected}"
    return None


def tool_schema(tool: Tool) -> dict[str, Any]:
    """The OpenAI/Qwen function-calling declaration that chat templates render."""
    function = {"name": tool.name, "description": tool.description, "parameters": tool.parameters}
    return {"type": "function", "function": function}


# name -> factory(**kwargs) -> Tool, so configs and recipes can pick tools by string.
TOOL_FACTORIES: dict[str, Callable[..., Tool]] = {}


def register_tool(name: str) -> Callable[[Callable[..., Tool]], Callable[..., Tool]]:
    def add(factory: Callable[..., Tool]) -> Callable[..., Tool]:
        if name in TOOL_FACTORIES:
            raise ConfigError(f"tool {name!r} is already registered")
        TOOL_FACTORIES[name] = factory
        return factory

    return add


def make_tool(name: str, **kwargs: Any) -> Tool:
    """Build a registered tool, e.g. ``make_tool("python", client=SandboxClient(url))``."""
    if name not in TOOL_FACTORIES:
        raise ConfigError(f"unknown tool {name!r}; registered tools: {sorted(TOOL_FACTORIES)}")
    return TOOL_FACTORIES[name](**kwargs)
