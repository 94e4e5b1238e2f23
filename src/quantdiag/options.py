"""The command line's options, built from RunConfig's declarations (``config.option``): each
option's name, help text and default are written once, next to the field it fills; this module
turns them into typer parameters and the values typed back into RunConfig fields."""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable, Iterable
from dataclasses import MISSING, Field, fields
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin, get_type_hints

import typer

from quantdiag.config import RunConfig
from quantdiag.errors import QuantdiagError

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")
#: RunConfig fields the command line sets, in the order ``--help`` lists them.
DECLARED: dict[str, Field] = {f.name: f for f in fields(RunConfig) if "help" in f.metadata}
_HINTS = get_type_hints(RunConfig)


def cli_name(field: str, renamed: dict[str, str] | None = None) -> str:
    """The parameter (``--name`` with dashes) that sets ``field``."""
    return (renamed or {}).get(field) or DECLARED[field].metadata["name"] or field


class Options:
    """One command's share of the declared options: as typer parameters of the command (set on
    its ``__signature__``), and the values given back as RunConfig fields (``config_fields``).
    ``keep``: options default to ``None`` (unless in ``defaults``), to keep a finished run's value."""

    def __init__(
        self,
        names: Iterable[str],
        keep: bool = False,
        renamed: dict[str, str] | None = None,
        defaults: dict[str, Any] | None = None,
    ) -> None:
        self.names = tuple(names)
        self.keep = keep
        self.renamed = renamed or {}
        self.defaults = defaults or {}

    def __call__(self, command: F) -> F:
        """``command``'s own parameters, then one keyword parameter per option (``**values``)."""
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.kind is not p.VAR_KEYWORD]
        command.__signature__ = inspect.Signature([*own, *map(self._parameter, self.names)])
        return command

    def config_fields(self, values: dict[str, Any]) -> dict[str, Any]:
        """RunConfig fields from the command's option ``values`` (comma lists, 'all', 'none'
        parsed); ``None`` where an option was not given under ``keep``. Raises QuantdiagError."""
        parsed = {}
        for field in self.names:
            parsed.update(_parse(field, values[cli_name(field, self.renamed)]))
        return parsed

    def _parameter(self, field: str) -> inspect.Parameter:
        name = cli_name(field, self.renamed)
        help_text, flag = DECLARED[field].metadata["help"], _HINTS[field] is bool
        option = typer.Option(f"--{name.replace('_', '-')}", help=help_text) if flag else typer.Option(help=help_text)
        default = self.defaults.get(field, None if self.keep else _cli_default(field))
        annotation = Annotated[self._type(field), option]
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)

    def _type(self, field: str) -> Any:
        """What typer parses the option as: text for lists (parsed here), a repeated option for
        ``compare``, else the field's own type (optional under ``keep``)."""
        if field == "compare":
            return list[str]
        if field == "facts_per_relation" or _element(field) is not None:
            return str | None
        base = _HINTS[field]
        return base | None if self.keep else base


def _cli_default(field: str) -> Any:
    """The option's default, from the field's: comma-joined for lists, ``--asym`` off when
    symmetric; a field without default makes a required option."""
    default = DECLARED[field].default
    if default is MISSING or field == "compare":
        return inspect.Parameter.empty
    if field == "sym":
        return not default
    if isinstance(default, tuple):
        return ",".join(map(str, default))
    return default


def _element(field: str) -> type | None:
    """The element type of a tuple field (``None``: not a tuple)."""
    hint = _HINTS[field]
    if get_origin(hint) in (Union, types.UnionType):
        hint = next(arg for arg in get_args(hint) if arg is not type(None))
    return get_args(hint)[0] if get_origin(hint) is tuple else None


def _parse(field: str, value: Any) -> dict[str, Any]:
    """The RunConfig fields one option's ``value`` sets."""
    what = f"--{cli_name(field).replace('_', '-')}"
    if field == "facts_per_relation":
        count = None if value in (None, "all") else _count(value, what)
        return {"facts_per_relation": count, "all_facts": value == "all"}
    if field == "sym":
        return {"sym": not value}
    if field == "compare":
        return {"compare": tuple(value)}
    kind = _element(field)
    if value is None or kind is None:
        return {field: value}
    if field == "analyses" and value == "none":
        return {field: ()}
    return {field: _names(value) if kind is str else _numbers(value, what, kind)}


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _numbers(text: str, what: str, kind: Callable[[str], T]) -> tuple[T, ...]:
    """Comma-separated ``kind`` values (int or float)."""
    try:
        return tuple(kind(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise QuantdiagError(
            f"{what} must be comma-separated {'integers' if kind is int else 'numbers'}, not '{text}'"
        ) from None


def _count(text: str, what: str) -> int:
    if not text.isdigit():
        raise QuantdiagError(f"{what} must be a positive number or 'all', not '{text}'")
    return int(text)
