"""Allowed values live with their field: ``opt(default, choices=..., ge=..., gt=..., lt=...)``
attaches a :class:`Rule` (OmegaConf 2.3 rejects ``Literal`` annotations, so the rule rides in the
field's metadata).  :func:`check_rules` walks the schema and checks every value at load, for
every command (``validate.py``)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A config file or override is wrong; the message says which key and why."""


INT_LIMIT = 2**63  # every integer key is read into 64-bit arrays and seeds


# ----------------------------------------------------------------------------------------- rules
@dataclass(frozen=True)
class Rule:
    """What a field's value (or, for a list, each element) may be; None bounds are unchecked.

    A None value passes (nullable fields); NaN and ±inf never pass a numeric bound."""

    choices: tuple | None = None
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    nonempty: bool = False  # lists: at least one element

    def problem(self, value: Any) -> str | None:
        """Why ``value`` breaks the rule (None when it does not)."""
        if value is None:
            return None
        if self.choices is not None and value not in self.choices:
            return f"must be one of {list(self.choices)}"
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        if not math.isfinite(value):
            return "must be a finite number"
        if isinstance(value, int) and not -INT_LIMIT <= value < INT_LIMIT:
            return f"must fit a 64-bit integer (below 2**63 = {INT_LIMIT})"
        bounds = [("ge", ">=", lambda v, b: v >= b), ("gt", ">", lambda v, b: v > b),
                  ("le", "<=", lambda v, b: v <= b), ("lt", "<", lambda v, b: v < b)]
        said = [f"{sym} {getattr(self, name):g}" for name, sym, ok in bounds
                if getattr(self, name) is not None]
        if any(getattr(self, name) is not None and not ok(value, getattr(self, name))
               for name, _, ok in bounds):
            return "must be " + " and ".join(said)
        return None


def opt(default: Any = dataclasses.MISSING, *, factory: Any = None, **rule: Any) -> Any:
    """A dataclass field with its :class:`Rule` (``opt(0.1, ge=0, lt=1)``)."""
    meta = {"rule": Rule(**{k: tuple(v) if k == "choices" else v for k, v in rule.items()})}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)
