"""Loading the tree (defaults, recipe YAML, flags, `section.key=value` overrides), saving and
printing it, and the one command-line front every entry point uses (`entry_config`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bld_t2i.config.tools import Config
from bld_t2i.config.types import ConfigError, _coerce, _nearest, _Section, field_name, public_key


def _apply(obj: Any, updates: dict, where: str) -> None:
    hints = typing.get_type_hints(type(obj))
    keys = [public_key(f.name) for f in dataclasses.fields(obj)]
    for key, value in updates.items():
        path = f"{where}.{key}" if where else key
        if key not in keys:
            raise ConfigError(f"unknown config key '{path}'{_nearest(key, keys)}")
        name = field_name(key)
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"'{path}' is a section; expected a mapping, got {value!r}")
            _apply(current, value, path)
        else:
            setattr(obj, name, _coerce(value, hints[name], f"'{path}'"))
    if isinstance(obj, _Section) and updates:
        obj.__post_init__()  # checks that span fields, or that a field's type cannot say


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form section.key=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    return key.strip().split("."), value


def load_config(recipe: str | Path | None = None, overrides: typing.Sequence[str] = (),
                values: dict | None = None) -> Config:
    """Defaults, then the recipe YAML, then `values` (a nested dict, from an entry point's
    flags), then `section.key=value` overrides."""
    cfg = Config()
    if recipe:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError(f"recipe not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe {path} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"recipe {path} must be a mapping of sections")
        try:
            _apply(cfg, data, "")
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    _apply(cfg, values or {}, "")
    for text in overrides:
        keys, value = _parse_override(text)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        _apply(cfg, nested, "")
    return cfg


def to_dict(cfg: Any) -> dict:
    """The tree (or a section) as plain data, under the keys recipes use (`public_key`)."""
    def keyed(value: Any) -> Any:
        return {public_key(k): keyed(v) for k, v in value.items()} if isinstance(value, dict) else value

    return keyed(dataclasses.asdict(cfg))


def from_dict(data: dict) -> Config:
    cfg = Config()
    _apply(cfg, data, "")
    return cfg


def to_sections(cfg: Config, sections: typing.Sequence[str] = ()) -> dict:
    """The tree as a dict, only `sections` of it when given (what one entry point uses)."""
    tree = to_dict(cfg)
    return {k: tree[k] for k in sections} if sections else tree


def dump_yaml(cfg: Config, sections: typing.Sequence[str] = ()) -> str:
    return yaml.safe_dump(to_sections(cfg, sections), sort_keys=False)


def save_config(cfg: Config, path: str | Path, sections: typing.Sequence[str] = ()) -> None:
    """The resolved config (only `sections` of it when given) as JSON, beside an output."""
    from bld_t2i.checkpoint import atomic_write_text

    atomic_write_text(path, json.dumps(to_sections(cfg, sections), indent=2))


# ----------------------------------------------------------------------------- CLI


@dataclass(frozen=True)
class Flag:
    """A command-line flag of an entry point, kept for its users: `--model X` sets `sample.model`.
    Its type, choices and default come from the config field it sets, unless `parse` (text ->
    value) or `nargs` say otherwise."""

    flag: str
    key: str  # section.field
    help: str = ""
    parse: typing.Callable[[str], Any] | None = None
    nargs: int | None = None


def _field_type(key: str) -> Any:
    section, name = key.split(".")
    return typing.get_type_hints(type(getattr(Config(), section)))[field_name(name)]


def _add_flag(parser: argparse.ArgumentParser, f: Flag) -> None:
    tp = _field_type(f.key)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # `int | None`: the flag gives the int
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    origin = typing.get_origin(tp)
    kwargs: dict[str, Any] = {"dest": f.key, "default": argparse.SUPPRESS, "help": f"{f.help} ({f.key})".strip()}
    if f.parse is not None or f.nargs is not None:
        kwargs["type"] = f.parse or (typing.get_args(tp)[0] if origin in (list, tuple) else tp)
        if f.nargs is not None:
            kwargs["nargs"] = f.nargs
    elif tp is bool:
        kwargs["action"] = "store_true"
    elif origin is typing.Literal:
        kwargs["choices"] = typing.get_args(tp)
        kwargs["type"] = type(typing.get_args(tp)[0])
    elif origin in (list, tuple):  # comma-separated on the command line: --guidance 0,2.5,10
        item = typing.get_args(tp)[0]
        kwargs["type"] = lambda text, item=item: [item(x) for x in text.split(",") if x != ""]
    elif tp in (int, float, str):
        kwargs["type"] = tp
    parser.add_argument(f.flag, **kwargs)


def _exit(message: str) -> typing.NoReturn:
    raise SystemExit(message)  # printed to stderr by the interpreter, exit status 1


def entry_config(description: str, sections: typing.Sequence[str], flags: typing.Sequence[Flag] = (),
                 argv: typing.Sequence[str] | None = None, required: typing.Sequence[str] = (),
                 recipe_required: bool = False) -> Config | None:
    """The front of every entry point: `[--recipe R] [--dry-run] [flags] [section.key=value ...]`.

    Defaults live in the dataclasses above; the recipe, then the flags, then the overrides
    change them. `required` keys must end up non-empty (the error names the flag and the key).
    `--dry-run` prints the `sections` this entry point uses and returns None.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--recipe", required=recipe_required, default="", help="recipe YAML in recipes/")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    for f in flags:
        _add_flag(parser, f)
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = vars(parser.parse_args(argv))
    values: dict = {}
    for f in flags:
        if f.key in args:
            section, name = f.key.split(".")
            values.setdefault(section, {})[name] = args[f.key]
    by_key = {f.key: f.flag for f in flags}
    try:
        cfg = load_config(args["recipe"], args["overrides"], values)
    except ConfigError as e:
        message = str(e)
        for key, flag in by_key.items():  # name the flag the user typed, and the key it sets
            if f"'{key}'" in message and key in args:
                message = message.replace(f"'{key}'", flag) + f" (config key {key})"
        _exit(f"config error: {message}")
    for key in required:
        section, name = key.split(".")
        if getattr(getattr(cfg, section), field_name(name)) in ("", None, []):
            via = f"{by_key[key]} or " if key in by_key else ""
            _exit(f"config error: {key} is empty; give it with {via}{key}=...")
    if args["dry_run"]:
        print(dump_yaml(cfg, sections), end="")
        return None
    return cfg


def config_from_cli(description: str, argv: typing.Sequence[str] | None = None,
                    sections: typing.Sequence[str] = ()) -> Config | None:
    """The trainers' front: `--recipe R [--dry-run] [k=v ...]`; returns None after a dry run."""
    return entry_config(description, sections, argv=argv, recipe_required=True)
