"""Reading the project's on/off environment switches."""

from __future__ import annotations

import os

#: Values (any case, surrounding spaces ignored) that turn a feature off.
OFF_VALUES = ("0", "false", "off", "no")


def switched_off(name: str) -> str | None:
    """The value of environment variable ``name`` (lower-cased) when it turns its feature off
    (``0``/``false``/``off``/``no``), else None (unset or any other value: on)."""
    value = os.environ.get(name, "").strip().lower()
    return value if value in OFF_VALUES else None
