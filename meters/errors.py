"""Errors of the metering domain.

MetersError
└── ValidationFailed      one or more field errors, each {type, loc, msg, input}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Loc = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class FieldError:
    """One problem with one field, in pydantic's error shape (what Polar returns)."""

    type: str
    loc: Loc
    msg: str
    input: Any = None

    def as_dict(self) -> dict[str, Any]:
        return {"type": self.type, "loc": list(self.loc), "msg": self.msg, "input": self.input}


class MetersError(Exception):
    """Root of every error raised by the `meters` package."""


class ValidationFailed(MetersError):
    """Input broke one or more rules; `errors` lists every one of them."""

    def __init__(self, errors: list[FieldError], *, business: bool = False) -> None:
        self.errors = errors
        # Polar reports schema problems as RequestValidationError and rule checks against
        # stored state (unknown customer, ...) as PolarRequestValidationError.
        self.business = business
        super().__init__(f"{len(errors)} validation error(s): {errors[0].msg if errors else ''}")
