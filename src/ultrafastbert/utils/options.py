"""Command-line options declared once, on the settings dataclasses.

A settings field made with :func:`option` carries what its command-line option needs (flag,
help, parser, metavar, choices) in its ``dataclasses`` metadata; its default is the field's
default and nothing else. The command line (:mod:`ultrafastbert.cli.options`) turns such fields
into argparse arguments and builds the settings back from the parsed namespace, so ``--help``
shows the default the library uses and the two cannot drift. :func:`nested` marks a field whose
value is another settings dataclass with options of its own (e.g. a recipe inside a run).

The value parsers here (:func:`parse_duration`, :func:`positive_int`, :func:`comma_list`) raise
:class:`~ultrafastbert.errors.InputError` with a message that names the problem; the command
line shows that message.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import InputError

#: The metadata key of an :class:`Option` or :class:`Nested` on a dataclass field.
OPTION_KEY = "ultrafastbert.option"

T = TypeVar("T")


@dataclass(frozen=True)
class Option:
    """How one settings field appears on the command line.

    Attributes:
        help: what the option does, without its default (the command line appends the default).
        flags: the option strings; empty: ``--field-name``; one name without dashes: a
            positional argument.
        metavar: the value's placeholder in ``--help``.
        choices: the allowed values (after parsing).
        parse: text -> value; None: the type of the default (``str`` when it is None).
        show: how ``--help`` shows the default: a function of the default, or fixed words;
            None: the default as it is (nothing for None and booleans).
        group: the ``--help`` section (an argparse argument group) it is listed under.
        exclusive: options sharing this name are mutually exclusive.
    """

    help: str
    flags: tuple[str, ...] = ()
    metavar: str | None = None
    choices: tuple[Any, ...] | None = None
    parse: Callable[[str], Any] | None = None
    show: Callable[[Any], str] | str | None = None
    group: str | None = None
    exclusive: str | None = None


@dataclass(frozen=True)
class Nested:
    """A field holding another settings dataclass whose option fields are options too."""

    group: str | None = None


def option(default: Any = dataclasses.MISSING, *, help: str,
           flags: tuple[str, ...] | str = (), metavar: str | None = None,
           choices: tuple[Any, ...] | None = None, parse: Callable[[str], Any] | None = None,
           show: Callable[[Any], str] | str | None = None, group: str | None = None,
           exclusive: str | None = None) -> Any:
    """A dataclass field that is also a command-line option (see :class:`Option`); without a
    ``default`` the option is required (or positional, when its flag has no dashes)."""
    flags = (flags,) if isinstance(flags, str) else tuple(flags)
    meta = Option(help=help, flags=flags, metavar=metavar, choices=choices, parse=parse,
                  show=show, group=group, exclusive=exclusive)
    return dataclasses.field(default=default, metadata={OPTION_KEY: meta})


def nested(factory: Callable[[], Any], *, group: str | None = None) -> Any:
    """A dataclass field holding the settings dataclass ``factory`` (its class) builds, whose
    option fields become options of the outer settings (listed under ``group``)."""
    return dataclasses.field(default_factory=factory, metadata={OPTION_KEY: Nested(group)})


@dataclass(frozen=True)
class OptionField:
    """One option of a settings class: ``path`` is the field's dotted path from the outer
    class (``recipe.lr``); ``default`` is the field's default (``dataclasses.MISSING``: none)."""

    path: str
    field: dataclasses.Field
    option: Option
    default: Any


def option_fields(cls: type, prefix: str = "", group: str | None = None
                  ) -> Iterator[OptionField]:
    """Every option of the settings dataclass ``cls``, nested ones included, in field order."""
    for f in dataclasses.fields(cls):
        meta = f.metadata.get(OPTION_KEY)
        path = prefix + f.name
        if isinstance(meta, Nested):
            inner = f.default_factory
            if not (isinstance(inner, type) and dataclasses.is_dataclass(inner)):
                raise TypeError(f"nested field {path} needs its dataclass as the factory")
            yield from option_fields(inner, path + ".", meta.group or group)
        elif isinstance(meta, Option):
            if group is not None and meta.group is None:
                meta = dataclasses.replace(meta, group=group)
            yield OptionField(path, f, meta, field_default(f))


def field_default(f: dataclasses.Field) -> Any:
    """The field's default value (a fresh one from its factory); ``MISSING`` when it has none."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def default_of(cls: type, name: str) -> Any:
    """The default of the field ``name`` of the dataclass ``cls``."""
    [f] = [f for f in dataclasses.fields(cls) if f.name == name]
    return field_default(f)


def not_options(cls: type, prefix: str = "") -> list[str]:
    """Dotted paths of the fields of ``cls`` (nested included) that are not options: the
    library sets them, or the command line derives them from other options."""
    out = []
    for f in dataclasses.fields(cls):
        meta = f.metadata.get(OPTION_KEY)
        if isinstance(meta, Nested):
            out += not_options(f.default_factory, f"{prefix}{f.name}.")  # type: ignore[arg-type]
        elif not isinstance(meta, Option):
            out.append(prefix + f.name)
    return out


# ------------------------------------------------------------------------------ value parsers
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_S = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(text: str) -> float:
    """``90s``, ``5m``, ``24h``, ``1h30m``, ``1.5h`` -> seconds (> 0)."""
    cleaned = text.strip().lower().replace(" ", "")
    parts = _DURATION.findall(cleaned)
    if not parts or "".join(n + u for n, u in parts) != cleaned:
        raise InputError(f"invalid duration {text!r}: give a number with a unit, e.g. 90s, 5m, "
                         "24h, 1h30m")
    seconds = sum(float(n) * _UNIT_S[u] for n, u in parts)
    if seconds <= 0:
        raise InputError(f"the duration must be > 0, got {text!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """Seconds -> the text :func:`parse_duration` reads back: ``1800`` -> ``30m``, ``5400`` ->
    ``1h30m``, ``2.5`` -> ``2.5s``."""
    if seconds <= 0 or seconds != int(seconds):
        return f"{seconds:g}s"
    rest, parts = int(seconds), []
    for unit in ("h", "m", "s"):
        count, rest = divmod(rest, _UNIT_S[unit])
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def positive_int(text: str) -> int:
    """An int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise InputError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise InputError(f"expected a number >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """A float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise InputError(f"expected a number > 0, got {value}")
    return value


def comma_list(item: Callable[[str], T]) -> Callable[[str], tuple[T, ...]]:
    """A parser of ``a,b,c`` into a tuple of ``item(a), item(b), ...`` (at least one)."""
    def parse(text: str) -> tuple[T, ...]:
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts:
            raise InputError(f"expected a comma-separated list, got {text!r}")
        try:
            return tuple(item(p) for p in parts)
        except ValueError as err:  # InputError is a ValueError too
            raise InputError(f"bad comma-separated list {text!r}: {err}") from None
    parse.__name__ = f"comma_list({getattr(item, '__name__', 'item')})"
    return parse


def show_list(values: Any) -> str:
    """A tuple default as ``--help`` shows it: ``1,8,32``."""
    return ",".join(str(v) for v in values)
