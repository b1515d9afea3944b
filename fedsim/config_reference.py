"""The config reference, generated from the pydantic models of fedsim/config.py.

`fedsim config show [CONFIG] [--set key=value ...]` prints every key of a config (its value,
default, allowed values and meaning) for an 80-column terminal; `fedsim config docs` prints
the Markdown of docs/config.md. No key is listed by hand: the models are walked, so a field
added to fedsim/config.py appears in both with its `description` as its meaning.
"""

from __future__ import annotations

import sys
import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from fedsim.config import ExperimentConfig

WIDTH = 80
DOCS_COMMAND = "fedsim config docs > docs/config.md"


@dataclass(frozen=True)
class Key:
    path: str  # dotted, as in `--set dp.epsilon=2`
    value: Any  # in the config shown
    default: Any
    allowed: str  # e.g. "float in (0, 1) or null", "one of pld, rdp"
    meaning: str


@dataclass(frozen=True)
class Section:
    path: str  # "dp", "model.arch"
    meaning: str
    keys: list[Key]


def _section_model(field: FieldInfo) -> type[BaseModel] | None:
    ann = field.annotation
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def _optional_model(field: FieldInfo) -> type[BaseModel] | None:
    """The model of a `Model | None` key (e.g. dp.adaptive_clip: null turns the feature off)."""
    kinds = [k for k in typing.get_args(field.annotation) if k is not type(None)]
    if len(kinds) == 1 and isinstance(kinds[0], type) and issubclass(kinds[0], BaseModel):
        return kinds[0]
    return None


def sections(cfg: BaseModel | None = None) -> list[Section]:
    """Every section of `cfg` (default: the defaults) in declaration order, each followed by
    its nested sections (`model` then `model.arch`, ...). A `Model | None` key is listed as a
    key (null or set) and its model as a section (its keys' defaults when the key is null)."""
    out: list[Section] = []

    def walk(node: BaseModel, path: str, meaning: str) -> None:
        keys, nested = [], []
        for name, field in type(node).model_fields.items():
            dotted = f"{path}.{name}" if path else name
            if _section_model(field) is not None:
                nested.append((getattr(node, name), dotted, field.description or ""))
            else:
                value = getattr(node, name)
                if (sub := _optional_model(field)) is not None:
                    nested.append((value if value is not None else sub(), dotted, sub.__doc__ or ""))
                    value = "set" if value is not None else None
                keys.append(Key(dotted, value, field.get_default(call_default_factory=True),
                                allowed(field), field.description or ""))
        if keys:
            out.append(Section(path, meaning, keys))
        for args in nested:
            walk(*args)

    walk(cfg if cfg is not None else ExperimentConfig(), "", "")
    return out


def config_models(model: type[BaseModel] = ExperimentConfig) -> list[type[BaseModel]]:
    """`model` and every model nested in it."""
    found = [model]
    for field in model.model_fields.values():
        if (sub := _section_model(field) or _optional_model(field)) is not None:
            found += config_models(sub)
    return found


def fmt(value: Any) -> str:
    """A value as it is written in YAML or after `--set key=`."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(fmt(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {fmt(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        return value or '""'
    return repr(value)


def _range(field: FieldInfo) -> str:
    bound = {op: getattr(m, op) for m in field.metadata for op in ("ge", "gt", "le", "lt") if hasattr(m, op)}
    low = f"[{fmt(bound['ge'])}" if "ge" in bound else f"({fmt(bound['gt'])}" if "gt" in bound else ""
    high = f"{fmt(bound['le'])}]" if "le" in bound else f"{fmt(bound['lt'])})" if "lt" in bound else ""
    if low and high:
        return f" in {low}, {high}"
    if low:
        return f" {'>=' if low[0] == '[' else '>'} {low[1:]}"
    if high:
        return f" {'<=' if high[-1] == ']' else '<'} {high[:-1]}"
    return ""


def _length(field: FieldInfo) -> str:
    sizes = {op: getattr(m, op) for m in field.metadata for op in ("min_length", "max_length") if hasattr(m, op)}
    return "".join(f", {'at least' if op == 'min_length' else 'at most'} {n}" for op, n in sizes.items())


def _choices(kind) -> str | None:
    return ", ".join(map(fmt, typing.get_args(kind))) if typing.get_origin(kind) is Literal else None


def allowed(field: FieldInfo) -> str:
    """The type, Literal choices, ge/gt/le/lt range and list length pydantic enforces, as one phrase."""
    ann = field.annotation
    union = typing.get_origin(ann) in (typing.Union, types.UnionType)
    kinds = typing.get_args(ann) if union else (ann,)
    parts = []
    for kind in kinds:
        if kind is type(None):
            continue
        item = typing.get_args(kind)[0] if typing.get_origin(kind) is list else None
        if (choices := _choices(kind)) is not None:
            parts.append(f"one of {choices}")
        elif item is not None and (choices := _choices(item)) is not None:
            parts.append(f"a list of {choices}{_length(field)}")
        elif isinstance(kind, type) and issubclass(kind, BaseModel):  # a `Model | None` key: its section follows
            parts.append("a section (its keys below)")
        else:
            name = kind.__name__ if isinstance(kind, type) else str(kind).replace("typing.", "")
            parts.append(name + _range(field) + _length(field))
    return " or ".join(parts + (["null"] if type(None) in kinds else []))


def _wrap(s: str, indent: str = "", hang: str = "") -> list[str]:
    return textwrap.wrap(s, WIDTH, initial_indent=indent, subsequent_indent=hang, break_long_words=False,
                         break_on_hyphens=False)


def text(cfg: BaseModel | None = None, source: str = "the defaults") -> str:
    """The reference with `cfg`'s values, wrapped for an 80-column terminal."""
    lines = _wrap(f"fedsim config of {source}: key = value (default; allowed), then its meaning")
    for section in sections(cfg):
        lines += ["", *_wrap(f"[{section.path}] {section.meaning}".rstrip(), hang="  ")]
        for key in section.keys:
            default = "default" if key.value == key.default else f"default {fmt(key.default)}"
            lines += _wrap(f"{key.path} = {fmt(key.value)}  ({default}; {key.allowed})", "  ", " " * 8)
            lines += _wrap(key.meaning, " " * 6, " " * 6)
    return "\n".join(lines) + "\n"


def _cell(s: str) -> str:
    # `|` would end the cell; `<name>` would be taken for an HTML tag
    return s.replace("|", "\\|").replace("<", "\\<")


def markdown() -> str:
    """docs/config.md: one table per section, of the defaults."""
    out = ["# Configuration reference", "",
           "Generated from the pydantic models in `fedsim/config.py` (each field's `description`)",
           f"by `{DOCS_COMMAND}`: do not edit it by hand (a test compares",
           "the two). `fedsim config show [CONFIG] [--set key=value ...]` prints the same keys with",
           "a config's values. A key is a dotted path: its YAML section and what `--set` takes;",
           "`null` is YAML's None. In a range, `[` and `]` include the bound, `(` and `)` exclude it.",
           "A relative path (data.path, data.public_path, model.path) is relative to the config file's",
           "directory, or to the working directory when given with `--set`; run.output_dir is always",
           "relative to the working directory. A run's config.yaml records the absolute paths."]
    for section in sections():
        out += ["", f"## `{section.path}`", "", section.meaning, "",
                "| key | default | allowed | meaning |", "| --- | --- | --- | --- |"]
        out += [f"| `{k.path}` | `{_cell(fmt(k.default))}` | {_cell(k.allowed)} | {_cell(k.meaning)} |"
                for k in section.keys]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    """`fedsim config show | docs`; a bad config raises ConfigError (one `error:` line via the CLI)."""
    from fedsim.cli import ArgumentParser
    from fedsim.config import load_config

    p = ArgumentParser(prog="fedsim config", description="The config reference: every key, its default, allowed"
                       " values and meaning.")
    sub = p.add_subparsers(dest="what", required=True)
    show = sub.add_parser("show", help="every key with its value in CONFIG (default: the built-in defaults)")
    show.add_argument("config", nargs="?", help="experiment YAML (default: none, the built-in defaults)")
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config value, e.g. --set dp.epsilon=2 (repeatable)")
    sub.add_parser("docs", help=f"the Markdown reference of the defaults ({DOCS_COMMAND})")
    try:
        args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    if args.what == "docs":
        sys.stdout.write(markdown())
    else:
        cfg = load_config(args.config, args.overrides)
        source = " ".join([args.config or "the defaults", *(f"--set {o}" for o in args.overrides)])
        sys.stdout.write(text(cfg, source))
    return 0
