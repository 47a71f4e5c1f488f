"""Options generated from a config dataclass: one option per field, named after it, its help and choices taken from
the field's metadata and its default from the field.

Every generated option has the default ``argparse.SUPPRESS``: an option the user did not give leaves no attribute in
the namespace, so :func:`given_values` holds exactly the options given, and the config's own defaults fill the
rest (``Config(**given_values(args, Config))``). The help's ``%(default)s`` is the field's default.

Field metadata read here (every key optional):

- ``help``: the option's help (None: none); ``{NAME}`` is replaced by ``help_values[NAME]``.
- ``choices``: the values allowed.
- ``option``: the option's name where it is not ``--field-name``; a boolean field whose default is True is a
  switch that turns it off (e.g. ``flip`` is ``--no-flip``), one whose default is False a switch that turns it on.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Mapping


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise TypeError(f"config field {f.name!r} has no default; a CLI option needs one")


def add_config_options(parser: argparse.ArgumentParser, config: type, types: Mapping[str, Callable | None], *,
                       required: tuple[str, ...] = (), help_values: Mapping[str, str] | None = None) -> None:
    """Add one option per field named in ``types`` (in that order) to ``parser``.

    Args:
        config: a dataclass; each named field needs a default and ``help`` in its metadata.
        types: field name -> the argparse type that parses its value (None: a switch, or a plain string).
        required: the fields whose option must be given.
        help_values: what replaces ``{NAME}`` in the help texts.
    """
    fields = {f.name: f for f in dataclasses.fields(config)}
    for name, convert in types.items():
        if name not in fields:
            raise ValueError(f"types names {name!r}, which is not a field of {config.__name__}")
        f = fields[name]
        meta = f.metadata
        if "help" not in meta:
            raise ValueError(f"{config.__name__}.{name} has no 'help' in its metadata; a CLI option needs one")
        default = _default(f)
        text = meta["help"]
        if text is not None:
            text = text.replace("%(default)s", str(default))
            for key, value in (help_values or {}).items():
                text = text.replace("{" + key + "}", value)
        kwargs = dict(dest=name, default=argparse.SUPPRESS, help=text)
        if isinstance(default, bool):
            kwargs["action"] = "store_false" if default else "store_true"
        else:
            if convert is not None:
                kwargs["type"] = convert
            if "choices" in meta:
                kwargs["choices"] = tuple(meta["choices"])
            if name in required:
                kwargs["required"] = True
        parser.add_argument(meta.get("option", "--" + name.replace("_", "-")), **kwargs)


def given_values(args: argparse.Namespace, config: type) -> dict:
    """The fields of ``config`` whose option was given on the command line, with their parsed values."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(config) if hasattr(args, f.name)}
