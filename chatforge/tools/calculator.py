"""Arithmetic for the calculator tool, parsed here by recursive descent: model text is never executed.

Grammar (usual precedence; ``**`` binds tighter than a unary minus on its left and is right-associative)::

    expression := term (("+" | "-") term)*
    term       := unary (("*" | "/" | "//" | "%") unary)*
    unary      := ("-" | "+") unary | power
    power      := atom ("**" unary)?            (also "^"; so -2**2 = -4 and 2**-1 = 0.5, as in Python)
    atom       := number | "(" expression ")"

Numbers are decimal (``12``, ``3.5``, ``1e3``); thousands separators are not accepted. Limits keep a
hostile expression cheap: 200 characters, 30 levels of nesting, exponents up to 1000 in magnitude and
results up to 1e300.
"""

from __future__ import annotations

import math
import re

from chatforge.errors import ChatforgeError

MAX_CHARS = 200
MAX_DEPTH = 30
MAX_EXPONENT = 1000
MAX_MAGNITUDE = 1e300
TOKEN = re.compile(r"\s*(?:(\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)|(\*\*|//|[-+*/%()^]))")


class CalculatorError(ChatforgeError):
    pass


def _tokens(text: str) -> list[str]:
    tokens, position = [], 0
    text = text.strip()
    while position < len(text):
        match = TOKEN.match(text, position)
        if not match or match.end() == position:
            raise CalculatorError(f"cannot read {text[position:position + 12]!r}: only numbers, + - * / // % ** ^ "
                                  "and parentheses are allowed")
        tokens.append(match.group(1) or ("**" if match.group(2) == "^" else match.group(2)))
        position = match.end()
    return tokens


class _Parser:
    def __init__(self, tokens: list[str]):
        self.tokens, self.position, self.depth = tokens, 0, 0

    def peek(self) -> str | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def take(self) -> str:
        token = self.peek()
        if token is None:
            raise CalculatorError("the expression ends too early")
        self.position += 1
        return token

    def expression(self) -> float:
        value = self.term()
        while self.peek() in ("+", "-"):
            value = value + self.term() if self.take() == "+" else value - self.term()
        return value

    def term(self) -> float:
        value = self.unary()
        while self.peek() in ("*", "/", "//", "%"):
            op, right = self.take(), self.unary()
            if op != "*" and right == 0:
                raise CalculatorError("division by zero")
            value = (
                value * right
                if op == "*"
                else value / right
                if op == "/"
                else value // right
                if op == "//"
                else value % right
            )
        return value

    def power(self) -> float:
        base = self.atom()
        if self.peek() == "**":
            self.take()
            exponent = self.unary()
            if abs(exponent) > MAX_EXPONENT:
                raise CalculatorError(f"exponent {exponent} is larger than {MAX_EXPONENT}")
            if base == 0 and exponent < 0:
                raise CalculatorError("division by zero")
            try:
                result = base**exponent
            except OverflowError:
                raise CalculatorError("the result is too large") from None
            if isinstance(result, complex):
                raise CalculatorError("a negative number to a fractional power has no real value")
            if abs(result) > MAX_MAGNITUDE:
                raise CalculatorError("the result is too large")
            return result
        return base

    def unary(self) -> float:
        if self.peek() in ("-", "+"):
            sign = -1 if self.take() == "-" else 1
            return sign * self.unary()
        return self.power()

    def atom(self) -> float:
        token = self.take()
        if token == "(":
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise CalculatorError(f"more than {MAX_DEPTH} nested parentheses")
            value = self.expression()
            if self.take() != ")":
                raise CalculatorError("a '(' is not closed")
            self.depth -= 1
            return value
        if token[0].isdigit() or token[0] == ".":
            return float(token) if any(c in token for c in ".eE") else int(token)
        raise CalculatorError(f"unexpected {token!r}")


def calculate(expression: str) -> int | float:
    """The value of an arithmetic expression; CalculatorError names what is wrong with a bad one."""
    if not isinstance(expression, str) or not expression.strip():
        raise CalculatorError("the expression is empty")
    if len(expression) > MAX_CHARS:
        raise CalculatorError(f"the expression is longer than {MAX_CHARS} characters")
    parser = _Parser(_tokens(expression))
    value = parser.expression()
    if parser.peek() is not None:
        raise CalculatorError(f"unexpected {parser.peek()!r} after a complete expression")
    if isinstance(value, float) and (math.isnan(value) or abs(value) > MAX_MAGNITUDE):
        raise CalculatorError("the result is too large")
    if isinstance(value, int) and abs(value) > MAX_MAGNITUDE:
        raise CalculatorError("the result is too large")
    return value


def format_number(value: int | float) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value) if isinstance(value, int) else f"{value:.10g}"
