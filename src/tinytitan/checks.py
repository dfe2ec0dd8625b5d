"""Type checks for values read from files and requests, where JSON and GGUF give any type anywhere."""

from __future__ import annotations

from typing import Any


def of_type(value: Any, kinds: type | tuple[type, ...]) -> bool:
    """isinstance, except that a bool is not an int (nor a float) unless `kinds` names bool: `true` is no
    layer count, token id or version."""
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    return isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool))
