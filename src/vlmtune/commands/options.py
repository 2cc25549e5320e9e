"""Command-line options from typed dataclass fields: the flag is the field's name (the YAML key), its help the
field's `help`, its type the field's — so each setting is described once, on its field (LitGPT's way).

    add_options(parser, DataConfig, ["dataset", "dataset_dir"])      # --dataset, --dataset_dir
    given = given_options(args, ["dataset", "dataset_dir"])          # {key: raw value} the user typed
    settings = build_options(ServeArgs, args)                        # a ServeArgs, typed and defaulted

Every flag is parsed as text and typed afterwards by the config's own rules (`config.coerce_value`), so `--lora_rank
x` and `lora_rank: x` fail with the same one-line error. A bool flag alone means true (`--bf16`); it also takes a
value (`--enable_thinking false`). A list is comma separated (`--labels a,b`), a mapping JSON or YAML.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Iterable, Sequence

from vlmtune.config import coerce_value, parse_override, read_yaml
from vlmtune.errors import VlmtuneError

_BOOL_WORDS = {"true": "true", "yes": "true", "1": "true", "false": "false", "no": "false", "0": "false"}


def type_members(hint: Any) -> tuple:
    """The types of a hint, `X | None` unpacked."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return tuple(a for a in typing.get_args(hint) if a is not type(None))
    return (hint,)


def _bool_word(text: str) -> str:
    word = _BOOL_WORDS.get(str(text).strip().lower())
    if word is None:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return word


def _metavar(hint: Any) -> str | None:
    kinds = type_members(hint)
    if int in kinds:
        return "N"
    if float in kinds:
        return "X"
    if any(typing.get_origin(k) is list for k in kinds):
        return "A,B"
    if dict in kinds or any(typing.get_origin(k) is dict for k in kinds):
        return "JSON"
    return None


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return None  # a default_factory (an empty list or mapping): nothing worth showing


def _show(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _fields(cls: type, names: Sequence[str] | None) -> list[dataclasses.Field]:
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    return [by_name[name] for name in names] if names is not None else list(by_name.values())


def add_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type,
                names: Sequence[str] | None = None, *, defaults: dict[str, Any] | None = None,
                flags: dict[str, Sequence[str]] | None = None, required: Iterable[str] = ()) -> list[str]:
    """One `--name` per field of the dataclass `cls` (all, or `names` in that order); returns the names.

    `defaults`: this command's default where it is not the field's (shown in the help). `flags`: the option strings
    of a field where they are not just `--name` (an older spelling kept working: `--run-dir`). The parsed value is
    None unless given: see `given_options` and `build_options`."""
    hints = typing.get_type_hints(cls)
    required = set(required)
    added = []
    for f in _fields(cls, names):
        default = (defaults or {}).get(f.name, _default_of(f))
        text = f.metadata.get("help", "")
        if default is not None and default != "" and f.name not in required:
            text = f"{text} (default: {_show(default)})"
        kwargs: dict[str, Any] = dict(dest=f.name, default=None, help=text.replace("%", "%%"))
        if bool in type_members(hints[f.name]):
            kwargs.update(nargs="?", const="true", type=_bool_word, metavar="true|false")
        else:
            kwargs["metavar"] = _metavar(hints[f.name])
        if f.name in required:
            kwargs["required"] = True
        parser.add_argument(*(flags or {}).get(f.name, [f"--{f.name}"]), **kwargs)
        added.append(f.name)
    return added


def given_options(args: argparse.Namespace, names: Iterable[str]) -> dict[str, Any]:
    """{name: value as typed} of the options the user gave."""
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def build_options(cls: type, args: argparse.Namespace, names: Sequence[str] | None = None, *,
                  defaults: dict[str, Any] | None = None, origin: str = "command line") -> Any:
    """An instance of the dataclass `cls` from the parsed options: each given value typed like its field, the
    rest this command's default or the field's."""
    values = dict(defaults or {})
    for name, value in given_options(args, [f.name for f in _fields(cls, names)]).items():
        try:
            values[name] = coerce_value(cls, name, value, origin)
        except VlmtuneError as exc:  # named as the user typed it: `--n must be an integer`
            raise VlmtuneError(str(exc).replace(f"{origin}: '{name}'", f"--{name}", 1)) from None
    return cls(**values)


def typed_options(cls: type, values: dict[str, Any], origin: str) -> dict[str, Any]:
    """`values` (a YAML's or a command line's) typed like the fields of `cls`."""
    return {name: coerce_value(cls, name, value, origin) for name, value in values.items()}


class OneLineParser(argparse.ArgumentParser):
    """argparse that raises VlmtuneError (one line, exit 1) instead of printing usage and exiting 2."""

    def error(self, message: str):  # type: ignore[override]
        raise VlmtuneError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def command_parser(name: str, doc: str, parser_class: type = argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The parser of `vlmtune NAME`: the module docstring's first line as the description, the rest (its usage
    examples) kept as written below the options."""
    first, _, rest = doc.strip("\n").partition("\n")
    return parser_class(prog=f"vlmtune {name}", description=first, epilog=rest.strip("\n") or None,
                        formatter_class=argparse.RawDescriptionHelpFormatter)


def add_config_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """The optional YAML and `key=value` overrides that commands taking the config's keys share."""
    parser.add_argument("config", nargs="?", help=f"optional YAML with any of these keys ({what})")
    parser.add_argument("overrides", nargs="*", help="key=value settings (override the YAML)")


def config_values(config: str | None, overrides: Sequence[str], flags: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """(flat values, origin for messages): the YAML's keys, then `key=value` overrides, then the flags.

    A first positional that looks like `key=value` rather than a YAML file is an override."""
    overrides = list(overrides)
    if config and "=" in config and not config.endswith((".yaml", ".yml")):
        overrides.insert(0, config)
        config = None
    values: dict[str, Any] = read_yaml(config) if config else {}
    for item in overrides:
        key, value = parse_override(item)
        values[key] = value
    values.update(flags)
    return values, config or "command line"


def add_config_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, names: Sequence[str], *,
                       defaults: dict[str, Any] | None = None, flags: dict[str, Sequence[str]] | None = None,
                       required: Iterable[str] = ()) -> list[str]:
    """`add_options` for keys of the run config (`config.py`), whatever their section, in the order given."""
    from vlmtune.config import SECTIONS, key_sections

    sections = key_sections()
    for name in names:
        add_options(parser, SECTIONS[sections[name][0]], [name], defaults=defaults, flags=flags, required=required)
    return list(names)
