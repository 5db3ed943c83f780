"""A calculator tool: arithmetic on numbers, a few math functions and constants.

Safe by construction: the expression is parsed with ``ast`` and only whitelisted nodes
are evaluated by this module's own walker (nothing reaches ``eval``), so names,
attributes, subscripts, lambdas and strings are refused before anything runs. Work is
bounded too: the text length, and every integer result is capped at ``MAX_INT_BITS``
(checked *before* a power is computed, so ``9**9**9`` is refused, not attempted).
"""

from __future__ import annotations

import ast
import math
import operator
from typing import Any, Callable

from rlpost.tools.base import check_arguments, register_tool

MAX_CHARS = 1000
MAX_INT_BITS = 4096  # about 1,233 decimal digits
Number = int | float

_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_CONSTANTS = {"pi": math.pi, "e": math.e, "tau": math.tau}


def _factorial(n: Number) -> int:
    if not isinstance(n, int) or not 0 <= n <= 450:  # 450! has ~1,000 digits
        raise ValueError("factorial takes an integer from 0 to 450")
    return math.factorial(n)


def _round(x: Number, ndigits: int | None = None) -> Number:
    # round(5, -10**9) would build 10**(10**9) internally.
    if ndigits is not None and (not isinstance(ndigits, int) or abs(ndigits) > 100):
        raise ValueError("round takes at most 100 digits")
    return round(x, ndigits)


_FUNCTIONS: dict[str, Callable[..., Number]] = {
    "abs": abs, "round": _round, "min": min, "max": max,
    "sqrt": math.sqrt, "exp": math.exp, "log": math.log, "log2": math.log2, "log10": math.log10,
    "sin": math.sin, "cos": math.cos, "tan": math.tan, "asin": math.asin, "acos": math.acos, "atan": math.atan,
    "floor": math.floor, "ceil": math.ceil, "factorial": _factorial, "gcd": math.gcd,
}


class CalculationError(ValueError):
    """The expression is not allowed or cannot be evaluated; the message is for the model."""


def _check_size(value: Number) -> Number:
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise CalculationError(f"an integer result exceeds {MAX_INT_BITS} bits")
    return value


def _power(base: Number, exponent: Number) -> Number:
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
        # |base|**exponent has about exponent * log2|base| bits; refuse before computing.
        if exponent * math.log2(abs(base)) > MAX_INT_BITS:
            raise CalculationError(f"{base}**{exponent} would exceed {MAX_INT_BITS} bits")
    result = base**exponent
    if isinstance(result, complex):
        raise CalculationError("the result is a complex number")
    return result


def _eval(node: ast.AST) -> Number:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant):
        if type(node.value) not in (int, float):  # bool, str, complex, None, bytes
            raise CalculationError(f"{node.value!r} is not a number")
        return _check_size(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            return _check_size(_power(left, right))
        return _check_size(_BINARY[type(node.op)](left, right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.Name):
        if node.id not in _CONSTANTS:
            raise CalculationError(f"unknown name {node.id!r}; constants: {sorted(_CONSTANTS)}")
        return _CONSTANTS[node.id]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords:
        if node.func.id not in _FUNCTIONS:
            raise CalculationError(f"unknown function {node.func.id!r}; functions: {sorted(_FUNCTIONS)}")
        return _check_size(_FUNCTIONS[node.func.id](*[_eval(a) for a in node.args]))
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitXor):
        raise CalculationError("'^' is not a power here; write a**b")
    raise CalculationError(f"{type(node).__name__} is not allowed in a calculation")


def calculate(expression: str) -> Number:
    """Evaluate an arithmetic expression; raises ``CalculationError`` with a message."""
    if len(expression) > MAX_CHARS:
        raise CalculationError(f"the expression is longer than {MAX_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise CalculationError(f"cannot parse the expression: {e}") from e
    try:
        return _eval(tree)
    except CalculationError:
        raise
    except (ArithmeticError, ValueError, TypeError, RecursionError) as e:  # 1/0, sqrt(-1), log(0), arity
        raise CalculationError(f"{type(e).__name__}: {e}") from e


@register_tool("calculator")
class CalculatorTool:
    name = "calculator"
    description = (
        "Evaluate an arithmetic expression and return the result. Supports + - * / // % ** "
        f"and parentheses, constants {', '.join(sorted(_CONSTANTS))}, and functions "
        f"{', '.join(sorted(_FUNCTIONS))}."
    )
    parameters = {
        "type": "object",
        "properties": {"expression": {"type": "string", "description": "e.g. (3 + 4) * sqrt(2) / 7"}},
        "required": ["expression"],
        "additionalProperties": False,
    }

    def __call__(self, arguments: dict[str, Any]) -> str:
        problem = check_arguments(self.parameters, arguments)
        if problem:
            return f"Error: {problem}."
        try:
            return repr(calculate(arguments["expression"]))
        except CalculationError as e:
            return f"Error: {e}."
