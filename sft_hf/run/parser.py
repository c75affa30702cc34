"""One way to parse every command: dataclasses (HfArgumentParser), a YAML file whose values become the parser's
defaults (as TRL's `TrlParser` does it), flags that override them, one-line errors that name the file or the flag,
and a `--help` that fits a screen. The recipe's own dataclasses are in sft_hf/run/config.py.

Imports neither torch nor Trainer: a command that never trains starts fast.
"""
from __future__ import annotations

import json
import logging
import re
import sys
import textwrap
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from enum import Enum
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from sft_hf.errors import RecipeError, did_you_mean

SECRET_KEY = re.compile(r"(^|_)(token|secret|password|api_key)$")  # hub_token: never logged nor saved
logger = logging.getLogger("sft_hf")


class RecipeParser(HfArgumentParser):
    """`HfArgumentParser` whose defaults come from a YAML recipe, as TRL's `TrlParser` does it: each value in the
    file becomes its argument's default (`set_defaults`, so argparse still converts and checks it), and a flag on
    the command line overrides it. A bad value is one `RecipeError` naming the recipe file or the command line."""

    def __init__(self, dataclass_types, recipe: dict | None = None, recipe_file=None, cli_names=(), **kwargs):
        super().__init__(dataclass_types, allow_abbrev=False, **kwargs)
        self.recipe, self.recipe_file, self.cli_names = dict(recipe or {}), recipe_file, set(cli_names)
        self.set_defaults(**self.recipe)

    def source(self, name: str | None) -> str:
        """Where a value came from: the recipe file, unless the command line set it."""
        return str(self.recipe_file) if name in self.recipe and name not in self.cli_names else "command line"

    def error(self, message: str):
        # argparse would print the whole usage (about 150 lines for training) above this one line, then exit
        message = re.sub(r"(--\w+)/--[\w-]+", r"\1", message)  # --learning_rate, not --learning_rate/--learning-rate
        key = re.match(r"argument --(\w+)", message)
        raise RecipeError(f"{self.source(key.group(1) if key else None)}: {message}")


@dataclass
class Command:
    """What a command parses: its dataclasses, how its help starts, and its conventions."""

    prog: str
    dataclass_types: tuple
    summary: str
    usage: str = "{prog} [recipe.yaml | --config recipe.yaml] [--<key> <value> ...]"
    positional: tuple[str, ...] = ()  # leading values without a flag, in this order (merge-lora's two folders)
    common: tuple[str, ...] = ()  # inherited keys (TrainingArguments') named in the short --help; --help_all has all
    supersedes: dict = field(default_factory=dict)  # a flag given → these file keys are dropped
    minimum: dict = field(default_factory=dict)  # least values argparse's types accept but a run cannot use


def parse_command(command: Command, argv: list[str] | None, default_recipe: Path | None = None):
    """argv (`--config recipe.yaml`, or the recipe first, then `--<key> <value>` flags) → (*dataclasses, recipe)
    where `recipe` holds every key the file or the command line set to a non-default value, secrets left out:
    saved as recipe.yaml, it parses back to the same arguments."""
    argv = _expand(list(sys.argv[1:] if argv is None else argv), command.positional)
    if help_asked := next((a for a in argv if a in ("-h", "--help", "--help_all")), None):
        i = argv.index(help_asked)
        key = argv[i + 1] if help_asked != "--help_all" and i + 1 < len(argv) else None
        print_help(command, show_all=help_asked == "--help_all", key=key.lstrip("-") if key else None)
        raise SystemExit(0)
    config = default_recipe
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise RecipeError("command line: --config needs a recipe file")
        config = Path(argv[i + 1])
        del argv[i: i + 2]
    cli_names = [a[2:].split("=")[0] for a in argv if a.startswith("--")]
    known = known_names(command.dataclass_types)
    _check_names(cli_names, known, "command line")
    cli_names = [n[3:] if n.startswith("no_") and n not in known else n for n in cli_names]  # --no_<flag>
    recipe = load_recipe_file(config, known) if config is not None else {}
    for name in cli_names:  # the command line wins, also over a file key that would override it indirectly
        for dropped in command.supersedes.get(name, ()):
            if recipe.pop(dropped, None) is not None:
                logger.info("--%s given: ignoring %s from %s", name, dropped, config)
    parser = RecipeParser(command.dataclass_types, recipe, config, cli_names, prog=command.prog)
    try:
        *parsed, unused = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ValueError as e:  # a dataclass's __post_init__ check: one line, not a traceback
        if isinstance(e, RecipeError):
            raise
        raise RecipeError(f"{config or 'command line'}: {e}") from e
    if unused:
        raise RecipeError(f"command line: unexpected {' '.join(unused)!r}: values follow their --flag, and a recipe "
                          "file comes first or after --config")
    for name, least in command.minimum.items():
        value = next((getattr(p, name) for p in parsed if hasattr(p, name)), None)
        if value is not None and value < least:
            raise RecipeError(f"{parser.source(name)}: {name} must be at least {least}, got {value}")
    return (*parsed, _effective_values(command, parsed, [*recipe, *cli_names]))


def _expand(argv: list[str], positional: tuple[str, ...]) -> list[str]:
    """`--config=x.yaml` → `--config x.yaml`; a leading recipe file → `--config file` (alignment-handbook's
    `train.py recipe.yaml --flag value`); leading values of a command's positional keys → `--key value`."""
    argv = [part for a in argv for part in (a.split("=", 1) if a.startswith("--config=") else [a])]
    leading = []
    while argv and not argv[0].startswith("-") and len(leading) < len(positional):
        leading.append(argv.pop(0))
    argv = [part for name, value in zip(positional, leading) for part in (f"--{name}", value)] + argv
    if argv and argv[0].endswith((".yaml", ".yml")) and not argv[0].startswith("-"):
        argv.insert(0, "--config")
    return argv


def load_recipe_file(path: Path, known: set[str]) -> dict:
    if not Path(path).is_file():
        raise RecipeError(f"recipe {path} not found")
    try:
        recipe = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe {path} is not valid YAML: {e}") from None
    if not isinstance(recipe, dict):
        raise RecipeError(f"recipe {path}: expected a mapping of argument names to values")
    _check_names(list(recipe), known, str(path))
    return recipe


def _effective_values(command: Command, parsed: list, names: list[str]) -> dict:
    # the defaults go through the same __post_init__ as the values (enums, derived values); required keys keep theirs
    required = [(f.name, getattr(p, f.name)) for p in parsed for f in fields(p)
                if f.init and f.default is MISSING and f.default_factory is MISSING]
    defaults = RecipeParser(command.dataclass_types).parse_args_into_dataclasses(
        args=[part for name, value in required for part in (f"--{name}", str(value))])
    values = {}
    for name in dict.fromkeys(names):  # file order, then the command line's new keys
        if SECRET_KEY.search(name):
            continue
        obj, default = next((p, d) for p, d in zip(parsed, defaults) if hasattr(p, name))
        value, default_value = _plain(getattr(obj, name)), _plain(getattr(default, name))
        if value != default_value:
            values[name] = value
    return values


def known_names(dataclass_types) -> set[str]:
    return {f.name for cls in dataclass_types for f in fields(cls) if f.init}


def _check_names(names: list[str], known: set[str], where: str) -> None:
    for name in names:
        if name not in known and not (name.startswith("no_") and name[3:] in known):  # --no_<flag> for booleans
            if where == "command line":
                hint = did_you_mean(name, known, shown=lambda close: f"--{close}")
                raise RecipeError(f"command line: unknown option --{name}" + (f"; {hint}" if hint else ""))
            hint = did_you_mean(name, known)
            raise RecipeError(f"{where}: unknown key {name!r}" + (f"; {hint}" if hint else ""))


def print_help(command: Command, show_all: bool = False, key: str | None = None) -> None:
    """A screen: the command's keys by group, names only (`--help <key>` describes one, `--help_all` all of them)."""
    if show_all:
        parser = RecipeParser(command.dataclass_types, prog=command.prog, description=command.summary)
        parser.print_help()
        return
    every = {f.name: (cls, f) for cls in command.dataclass_types for f in fields(cls) if f.init}
    if key is not None:
        if key not in every:
            hint = did_you_mean(key, every)
            raise RecipeError(f"--help {key}: no such key" + (f"; {hint}" if hint else ""))
        cls, f = every[key]
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        print(f"--{key} ({_plain(default)!r} by default; {cls.__name__})")
        print(textwrap.fill(f.metadata.get("help", ""), 118, initial_indent="  ", subsequent_indent="  "))
        return
    lines = ["usage: " + command.usage.format(prog=command.prog), "",
             "\n\n".join(paragraph if paragraph.startswith(" ") else textwrap.fill(paragraph, 118)
                          for paragraph in command.summary.split("\n\n")), ""]
    for cls in command.dataclass_types:  # keys a class inherits (TrainingArguments') only when common
        inherited = {f.name for base in cls.__mro__[1:] if is_dataclass(base) for f in fields(base)}
        names = [f.name for f in fields(cls) if f.init and (f.name not in inherited or f.name in command.common)]
        lines += _columns(getattr(cls, "_argument_group_name", cls.__name__), names)
    lines += ["", "--help <key>: what a key does and its default. --help_all: every key described"
              + (", inherited ones too." if command.common else ".")]
    print("\n".join(lines))


def _columns(title: str, names: list[str], width: int = 118) -> list[str]:
    lines, line = [], f"  {title + ':':<10}".ljust(len(title) + 4)
    for name in names:
        if len(line) + len(name) + 2 > width:
            lines.append(line.rstrip(", ") + ",")
            line = " " * 12
        line += name + ", "
    return lines + [line.rstrip(", ")]


def _plain(value):
    """YAML-safe: enums by value, tuples as lists."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, tuple):
        return list(value)
    return value


def format_recipe(values: dict) -> str:
    """One compact line for the log: key=value, ..."""
    return ", ".join(f"{k}={json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in values.items())


def save_recipe(values: dict, path: str | Path) -> None:
    """recipe.yaml: re-run the same run with `--config path`."""
    header = "# The effective recipe of this run (non-default values): re-run it with --config recipe.yaml\n"
    Path(path).write_text(header + yaml.safe_dump(values, sort_keys=False, allow_unicode=True))
