"""Reading a JSON document field by field, with the field's key path in every error. Torch-free.

    f = Field(json.loads(text), file=path, error=BuildError, fix="re-export the build")
    f["heads"].elements()[0]["graph"].text()
        -> "loc_heads"                                  or, for {"heads": [{}]}:
        BuildError("<path>: heads[0].graph: missing; re-export the build")

Each reader checks the JSON type (an integer is not a bool, a float or a string) and, where given, the range, so a
malformed document gives one line naming the field instead of a KeyError or TypeError.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path


def shown(v) -> str:
    """A JSON value as an error message shows it: short, and objects and lists by kind only."""
    if isinstance(v, (dict, list)):
        return "an object" if isinstance(v, dict) else "a list"
    s = json.dumps(v)
    return s if len(s) <= 40 else s[:37] + "..."


def plain(v):
    """Mappings and tuples, at any depth, as the dicts and lists JSON writes."""
    if isinstance(v, Mapping):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    return v


def too_deep(data, limit: int) -> str | None:
    """The key path of the first value nested deeper than `limit` levels, or None. Iterative: any depth is safe."""
    stack = [(data, "", 0)]
    while stack:
        v, key, depth = stack.pop()
        if depth > limit:
            return key if len(key) <= 60 else key[:57] + "..."
        if isinstance(v, dict):
            stack += [(x, f"{key}.{k}" if key else str(k), depth + 1) for k, x in v.items()]
        elif isinstance(v, list):
            stack += [(x, f"{key}[{i}]", depth + 1) for i, x in enumerate(v)]
    return None


def _bounds(lo, hi, positive: bool = False) -> str:
    """The range as an error shows it: ' between 1 and 9', ' >= 0', ' > 0 and <= 1' or ''."""
    if lo is not None and hi is not None and not positive:
        return f" between {lo} and {hi}"
    parts = ["> 0" if positive else f">= {lo}" if lo is not None else "", f"<= {hi}" if hi is not None else ""]
    parts = [p for p in parts if p]
    return " " + " and ".join(parts) if parts else ""


class Field:
    """One value of a JSON document and its key path ("heads[0].graph"). Errors are `error` instances reading
    "<file>: <key path>: <what>; <fix>"."""

    def __init__(self, value, key: str = "", *, file: Path, error: type[Exception] = ValueError, fix: str = ""):
        self.value, self.key, self.file, self._error, self._fix = value, key, file, error, fix

    def at(self, value, key: str) -> "Field":
        """Another value of the same document, at `key`."""
        return Field(value, key, file=self.file, error=self._error, fix=self._fix)

    def error(self, what: str) -> Exception:
        where = f"{self.key}: " if self.key else ""
        return self._error(f"{self.file}: {where}{what}" + (f"; {self._fix}" if self._fix else ""))

    def expected(self, kind: str) -> Exception:
        return self.error(f"expected {kind}, found {shown(self.value)}")

    def _child(self, name: str) -> str:
        return f"{self.key}.{name}" if self.key else str(name)

    def object(self, known: tuple[str, ...] | None = None) -> dict:
        """The value, a JSON object; with `known`, an error names the first other key."""
        if not isinstance(self.value, dict):
            raise self.expected("an object")
        unknown = [k for k in self.value if known is not None and k not in known]
        if unknown:
            raise self.at(None, self._child(unknown[0])).error("unknown field")
        return self.value

    def __getitem__(self, name: str) -> "Field":
        if name not in self.object():
            raise self.at(None, self._child(name)).error("missing")
        return self.at(self.value[name], self._child(name))

    def optional(self, name: str) -> "Field | None":
        """The field, or None when it is absent or null."""
        return None if self.object().get(name) is None else self[name]

    def items(self) -> list[tuple[str, "Field"]]:
        return [(k, self.at(v, self._child(k))) for k, v in self.object().items()]

    def elements(self, n: int | None = None) -> list["Field"]:
        """The values of a JSON list (of exactly `n` values, when given)."""
        if not isinstance(self.value, list):
            raise self.expected("a list")
        if n is not None and len(self.value) != n:
            raise self.error(f"expected {n} values, found {len(self.value)}")
        return [self.at(v, f"{self.key}[{i}]") for i, v in enumerate(self.value)]

    def text(self) -> str:
        if not isinstance(self.value, str):
            raise self.expected("a string")
        return self.value

    def choice(self, choices, what: str) -> str:
        """A string among `choices`; the error says "'x' is not <what> (a, b, c)"."""
        if self.text() not in choices:
            raise self.error(f"{self.value!r} is not {what} ({', '.join(choices)})")
        return self.value

    def integer(self, lo: int | None = 1, hi: int | None = None) -> int:
        """An integer in [lo, hi] (None: unbounded); positive by default."""
        v = self.value
        if not isinstance(v, int) or isinstance(v, bool) or (lo is not None and v < lo) or (hi is not None and v > hi):
            raise self.expected(f"an integer{_bounds(lo, hi)}")
        return v

    def number(self, lo: float | None = None, hi: float | None = None, *, positive: bool = False) -> float:
        """A finite number (an integer is read as a float) in [lo, hi], and > 0 when `positive`."""
        v = self.value
        if (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or (positive and v <= 0)
                or (lo is not None and v < lo) or (hi is not None and v > hi)):
            raise self.expected(f"a number{_bounds(lo, hi, positive)}")
        return float(v)

    def flag(self) -> bool:
        if not isinstance(self.value, bool):
            raise self.expected("true or false")
        return self.value
