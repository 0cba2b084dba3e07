"""Model parameters (config.pbtxt ``parameters``) as both sides read them."""

from __future__ import annotations


def parse_bool(value: str, name: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no", ""):
        return False
    raise ValueError(f"{name} parameter {value!r} is not true or false")
