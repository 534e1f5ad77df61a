"""The OpenAI error of a refused request, and typed readers of a request body's fields.

``null`` stands for "not given" everywhere; a field of the wrong type is refused with 400 and the
field's name as ``param`` (bool is never a number).
"""
from __future__ import annotations

from typing import Any

__all__ = ["ApiError", "error_body", "bad", "type_name", "get", "get_int", "get_number", "get_bool",
           "get_str", "in_range"]


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """The OpenAI error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class ApiError(Exception):
    """A request refused with an HTTP status and an OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body to send."""
        return error_body(self.message, self.type, self.param, self.code)


def bad(param: str | None, message: str) -> ApiError:
    """A 400 about ``param``."""
    return ApiError(400, message[:500], param)


def type_name(v: Any) -> str:
    """The JSON name of ``v``'s type."""
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object", type(None): "null"}.get(type(v), type(v).__name__)


def get(body: dict[str, Any], name: str, kinds: tuple[type, ...], what: str) -> Any:
    """body[name] when given and not null, checked against ``kinds``."""
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) and bool not in kinds or not isinstance(v, kinds):
        raise bad(name, f"'{name}' must be {what}, got {type_name(v)} {v!r}"[:300])
    return v


def get_int(body: dict[str, Any], name: str) -> int | None:
    """An integer field."""
    return get(body, name, (int,), "an integer")


def get_number(body: dict[str, Any], name: str) -> float | None:
    """A number field, as a float."""
    v = get(body, name, (int, float), "a number")
    return None if v is None else float(v)


def get_bool(body: dict[str, Any], name: str) -> bool | None:
    """A boolean field."""
    return get(body, name, (bool,), "a boolean")


def get_str(body: dict[str, Any], name: str) -> str | None:
    """A string field."""
    return get(body, name, (str,), "a string")


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def in_range(name: str, v: float, lo: float, hi: float, lo_open: bool = False) -> None:
    """Refuse ``v`` outside [lo, hi] ((lo, hi] with ``lo_open``); NaN is outside every range."""
    if not ((lo < v if lo_open else lo <= v) and v <= hi):
        raise bad(name, f"'{name}' must be in {'(' if lo_open else '['}{_num(lo)}, {_num(hi)}], got {_num(v)}")
