"""argparse arguments from a settings dataclass, and the settings back from the namespace.

The options are declared once, on the settings fields (:mod:`ultrafastbert.utils.options`):
the argparse default of each option IS the field's default, so ``--help`` shows what the
library uses. A command adds its settings' options with :func:`add_options`, its own
command-line-only options (``--threads``, ``--out`` of a benchmark) by hand, and builds the
settings with :func:`settings_from_args`, giving the fields it derives (``given``).

A settings class may live in a module that is slow to import or needs an extra (``convert``
needs transformers): :class:`CommandParser` adds such options only when its command is parsed
(:func:`when_used`), so ``ultrafastbert --help`` and the other commands stay fast.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ..utils.options import OPTION_KEY, Nested, Option, OptionField, not_options, option_fields

S = TypeVar("S")


class CommandParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that adds some arguments only when it is first used (parsing or
    ``--help``); the parser class of every ``ultrafastbert`` command."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deferred: list[tuple[Callable[[], None], str]] = []

    def defer(self, add: Callable[[], None], extra: str) -> None:
        """Run ``add`` (which adds arguments) before this parser is first used; ``extra``: the
        package extra its imports need, named when one is missing."""
        self._deferred.append((add, extra))

    def _add_deferred(self) -> None:
        while self._deferred:
            add, extra = self._deferred.pop(0)
            try:
                add()
            except ModuleNotFoundError as err:
                if not err.name or err.name.split(".")[0] == "ultrafastbert":
                    raise  # our own import is broken: a bug, with its traceback
                self.error(f"this command needs the '{extra}' extra ({err.name} is missing): "
                           f"pip install 'ultrafastbert[{extra}]'")

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self._add_deferred()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._add_deferred()
        return super().format_help()


def when_used(parser: argparse.ArgumentParser, add: Callable[[], None], extra: str) -> None:
    """Run ``add`` (which adds arguments to ``parser``) when the command is first parsed (a
    :class:`CommandParser`), else now; ``extra``: the package extra its imports need."""
    if isinstance(parser, CommandParser):
        parser.defer(add, extra)
    else:
        add()


def add_options(parser: argparse.ArgumentParser, cls: type,
                only: tuple[str, ...] | None = None) -> None:
    """Add an argument for every option of the settings dataclass ``cls`` (nested included;
    ``only``: those with these dotted paths), under the ``--help`` sections their ``group``
    names; each argument's ``dest`` is the field's dotted path."""
    exclusive: dict[str, Any] = {}
    for of in option_fields(cls):
        if only is not None and of.path not in only:
            continue
        opt = of.option
        target = parser if opt.group is None else section(parser, opt.group)
        if opt.exclusive is not None:
            if opt.exclusive not in exclusive:
                exclusive[opt.exclusive] = target.add_mutually_exclusive_group()
            target = exclusive[opt.exclusive]
        flags, kwargs = argument(of)
        target.add_argument(*flags, **kwargs)


def section(parser: argparse.ArgumentParser, title: str) -> Any:
    """The ``--help`` section (argument group) ``title`` of ``parser``, made when missing, so a
    command can list its own options beside the settings' options of that section."""
    for group in parser._action_groups:  # argparse has no public lookup
        if group.title == title:
            return group
    return parser.add_argument_group(title)


def argument(of: OptionField) -> tuple[tuple[str, ...], dict[str, Any]]:
    """The ``add_argument`` flags and keywords of one option."""
    opt, default = of.option, of.default
    flags = opt.flags or ("--" + of.field.name.replace("_", "-"),)
    positional = len(flags) == 1 and not flags[0].startswith("-")
    kwargs: dict[str, Any] = {"help": help_text(opt, default)}
    if positional:
        return (of.path,), {**kwargs, "type": _parser(of), "metavar": opt.metavar or flags[0]}
    kwargs["dest"] = of.path
    if isinstance(default, bool):
        if default != flags[0].startswith("--no-"):
            raise TypeError(f"{of.path}: a True default takes a --no-... flag (store_false), "
                            f"a False one a flag without --no-, got {flags}")
        return flags, {**kwargs, "action": "store_false" if default else "store_true",
                       "default": default}
    if default is dataclasses.MISSING:
        kwargs["required"] = True
    else:
        kwargs["default"] = default
    if opt.choices is not None:
        kwargs["choices"] = opt.choices
    if opt.metavar is not None:
        kwargs["metavar"] = opt.metavar
    elif opt.choices is None:  # argparse would derive it from the dest, e.g. RECIPE.LR
        kwargs["metavar"] = flags[0].lstrip("-").upper().replace("-", "_")
    return flags, {**kwargs, "type": _parser(of)}


def help_text(opt: Option, default: Any) -> str:
    """The option's help with its default appended, as ``--help`` shows it."""
    if callable(opt.show):
        shown: str | None = opt.show(default)
    elif opt.show is not None:
        shown = opt.show
    elif default is None or isinstance(default, bool) or default is dataclasses.MISSING:
        shown = None
    elif isinstance(default, float):
        shown = f"{default:g}"
    elif isinstance(default, tuple):
        shown = ",".join(str(v) for v in default)
    else:
        shown = str(default)
    text = opt.help if not shown else f"{opt.help} (default: {shown})"
    return text.replace("%", "%%")  # argparse %-formats help strings


def _parser(of: OptionField) -> Callable[[str], Any] | None:
    """What turns the option's text into its value: ``parse``, else the default's type."""
    parse = of.option.parse
    if parse is None:
        default = of.default
        if default is None or default is dataclasses.MISSING or isinstance(default, str):
            return None  # text as it is
        if isinstance(default, Path):
            return Path
        if type(default) in (int, float):
            return type(default)
        raise TypeError(f"{of.path}: give parse= for a default of type "
                        f"{type(default).__name__}")
    return argparse_type(parse)


def argparse_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` as an argparse ``type``: its ``ValueError`` (the library's ``InputError``)
    becomes argparse's error with the message as it is."""
    if parse in (int, float, str, Path):
        return parse

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def settings_from_args(cls: Callable[..., S], args: argparse.Namespace, **given: Any) -> S:
    """The settings ``cls`` from the parsed options (nested settings built alike); ``given``
    holds the fields the command derives itself (never an option's field)."""
    offered = {of.path for of in option_fields(cls)}
    if set(given) & offered:
        raise TypeError(f"{sorted(set(given) & offered)} is an option of {cls.__name__}: it "
                        "cannot also be given")
    unknown = set(given) - set(not_options(cls))
    if unknown:
        raise TypeError(f"{sorted(unknown)}: not fields of {cls.__name__}")
    return _build(cls, args, "", given)


def _build(cls: Any, args: argparse.Namespace, prefix: str, given: dict[str, Any]) -> Any:
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        meta, path = f.metadata.get(OPTION_KEY), prefix + f.name
        if isinstance(meta, Option):
            values[f.name] = getattr(args, path)
        elif isinstance(meta, Nested):
            values[f.name] = _build(f.default_factory, args, path + ".", given)
        elif path in given:
            values[f.name] = given[path]
    return cls(**values)


def disagreements(parser: argparse.ArgumentParser, cls: type) -> list[str]:
    """Where ``parser`` and the settings class ``cls`` disagree: an option field with no
    argument or with more than one, an argument whose default is not the field's default, a
    required field the command line does not require. Empty when they agree (the test of every
    command checks that)."""
    if isinstance(parser, CommandParser):
        parser._add_deferred()
    actions: dict[str, list[argparse.Action]] = {}
    for action in parser._actions:  # argparse has no public list of a parser's arguments
        actions.setdefault(action.dest, []).append(action)
    problems = []
    for of in option_fields(cls):
        found = actions.get(of.path, [])
        if len(found) != 1:
            problems.append(f"{of.path}: {len(found)} command-line arguments, want 1")
            continue
        action = found[0]
        if of.default is dataclasses.MISSING:
            if not (action.required or not action.option_strings):
                problems.append(f"{of.path}: required in the settings, optional on the command "
                                "line")
        elif action.default != of.default:
            problems.append(f"{of.path}: command-line default {action.default!r}, settings "
                            f"default {of.default!r}")
    return problems
