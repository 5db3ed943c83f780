"""The calculator tool: hand-computed arithmetic, the AST whitelist refusing code, and
the bounds that keep a single call cheap."""

import math

import pytest

from rlpost.errors import ConfigError
from rlpost.tools import CalculationError, CalculatorTool, Tool, calculate, make_tool, tool_schema
from rlpost.tools.calculator import MAX_INT_BITS


@pytest.mark.parametrize(
    "expression, expected",
    [
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("2 ** 10", 1024),
        ("2 ** 3 ** 2", 512),  # right-associative: 2 ** 9
        ("-2 ** 2", -4),  # unary minus binds looser than **
        ("7 // 2", 3),
        ("-7 // 2", -4),  # floor division rounds down
        ("7 % 3", 1),
        ("7 / 2", 3.5),
        ("2 ** -1", 0.5),
        ("sqrt(16) + abs(-3)", 7.0),
        ("max(3, 9, 4) - min(3, 9, 4)", 6),
        ("factorial(5)", 120),
        ("gcd(12, 18)", 6),
        ("round(2.675, 1)", 2.7),
        ("floor(-2.5)", -3),
    ],
)
def test_arithmetic(expression, expected):
    assert calculate(expression) == expected


def test_constants_and_functions():
    assert calculate("pi") == math.pi
    assert calculate("sin(pi / 2)") == 1.0
    assert calculate("log(e)") == 1.0
    assert calculate("log(8, 2)") == 3.0


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os').system('true')",
        "(1).__class__",
        "open('/etc/passwd')",
        "[1, 2][0]",
        "lambda: 1",
        "x",
        "'a' * 3",
        "True + 1",
        "1j * 1j",
        "sqrt(x=4)",
        "(lambda: 1)()",
        "1 if 1 else 2",
        "1 < 2",
        "2 ^ 3",
    ],
)
def test_refuses_non_arithmetic(expression):
    with pytest.raises(CalculationError):
        calculate(expression)


def test_bounds():
    # 2**4096 has 4097 bits: refused before being computed; 2**4095 is allowed.
    assert calculate(f"2 ** {MAX_INT_BITS - 1}") == 2 ** (MAX_INT_BITS - 1)
    for expression in [f"2 ** {MAX_INT_BITS}", "9 ** 9 ** 9", "10 ** 10 ** 10", "factorial(10 ** 6)", "round(5, -10 ** 9)"]:
        with pytest.raises(CalculationError):
            calculate(expression)
    with pytest.raises(CalculationError, match="longer"):
        calculate("1+" * 600 + "1")
    with pytest.raises(CalculationError):
        calculate("(" * 500 + "1" + ")" * 500)  # deep nesting is refused, not a crash


@pytest.mark.parametrize("expression", ["1 / 0", "sqrt(-1)", "log(0)", "(-8) ** (1 / 3)", "exp(1000)", "min()"])
def test_math_errors_are_reported(expression):
    with pytest.raises(CalculationError):
        calculate(expression)


def test_tool_interface():
    tool = CalculatorTool()
    assert isinstance(tool, Tool)
    assert tool({"expression": "6 * 7"}) == "42"
    assert tool({"expression": "1 / 4"}) == "0.25"
    assert tool({"expression": "1 / 0"}).startswith("Error:")
    assert tool({}) == "Error: missing required argument(s) ['expression']."
    assert tool({"expression": 3}).startswith("Error: argument 'expression' must be of type string")
    assert tool({"expression": "1", "extra": 1}).startswith("Error: unknown argument(s)")
    schema = tool_schema(tool)
    assert schema["function"]["name"] == "calculator"
    assert schema["function"]["parameters"]["required"] == ["expression"]


def test_registry():
    assert make_tool("calculator")({"expression": "2 + 2"}) == "4"
    with pytest.raises(ConfigError, match="unknown tool 'abacus'"):
        make_tool("abacus")
