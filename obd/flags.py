"""Command-line flags generated from the config dataclasses (the CleanRL way: the CLI is the config).

Every leaf field of :class:`obd.config.RunConfig` becomes ``--dotted.name`` (``--distill.inner_lr 0.05``,
``--eval.hidden [64,64]``); its help is the field's own comment in ``obd/config.py`` and its default
the dataclass default. Values are read as YAML scalars or lists and then checked by the one config
builder, so a wrong type or range is the same one-line error as in a config file. Short aliases
(``--seed``, ``--alpha``, ...) name the common fields; an alias and its long flag are the same flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import tokenize
import typing
from typing import Any

from obd.config import RunConfig, nest, type_name
from obd.errors import ConfigError

# alias -> dotted RunConfig key
ALIASES: dict[str, str] = {
    "method": "distill.method",
    "seed": "distill.seed",
    "start": "distill.start",
    "alpha": "density.alpha",
    "data-seed": "data.data_seed",
    "size": "data.size",
    "teacher": "teacher.path",
    "n-synthetic": "distill.n_synthetic",
    "inner-steps": "distill.inner_steps",
    "truncate": "distill.truncate",
    "outer-lr": "distill.outer_lr",
    "outer-steps": "outer_steps",
    "eval-every": "eval_every",
    "policies": "eval.policies",
    "episodes": "eval.episodes",
    "threads": "threads",
    "device": "device",
    "out": "out",
}


NOT_FLAGS = ("budget",)  # set by the config builder to the --budget it applied


def field_comments(cls: type) -> dict[str, str]:
    """Each field's comment in a dataclass's source: the one trailing its line, else the comment
    lines right above it."""
    out: dict[str, str] = {}
    above: list[str] = []
    field_line: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(inspect.getsource(cls)).readline):
        row, col = tok.start
        if tok.type == tokenize.COMMENT:
            if row in field_line:
                out[field_line[row]] = tok.string.lstrip("# ").strip()
            elif col == 4:
                above.append(tok.string.lstrip("# ").strip())
        elif tok.type == tokenize.NAME and col == 4 and row not in field_line:
            field_line[row] = tok.string
            if above:
                out[tok.string] = " ".join(above)
            above = []
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.COMMENT):
            if col == 4:
                above = []
    return out


def leaves(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, Any, Any, str]]:
    """(dotted key, type, default, help) for every leaf field, in declaration order."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    default = cls()
    out = []
    for f in dataclasses.fields(cls):
        value = getattr(default, f.name)
        if dataclasses.is_dataclass(value):
            out += leaves(type(value), f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", hints[f.name], value, comments.get(f.name, "")))
    return out


def _yaml_value(text: str) -> Any:
    """A flag's value as YAML reads it (1e-3 and other numbers YAML 1.1 leaves as text, too)."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        for number in (int, float):
            try:
                return number(value)
            except ValueError:
                pass
    return value


# what a table or a study sets per run itself: not flags of those commands
PER_RUN = (
    "data.source",
    "data.task",
    "distill.method",
    "distill.seed",
    "out",
    "wandb_group",
    "wandb_job_type",
    "wandb_name",
)


def add_config_flags(p: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """``--dotted.key`` for every RunConfig leaf (with its alias where it has one), into dest ``cfg:KEY``;
    ``exclude``: keys the command sets itself."""
    alias_of = {v: k for k, v in ALIASES.items()}
    group = p.add_argument_group("configuration (any RunConfig field; see --print-config)")
    for key, tp, default, help_text in leaves():
        if key in NOT_FLAGS or key in exclude:
            continue
        names = [f"--{key}"] + ([f"--{alias_of[key]}"] if alias_of.get(key, key) != key else [])
        shown = f"{type_name(tp)}; default {default!r}"
        group.add_argument(
            *names,
            dest=f"cfg:{key}",
            type=_yaml_value,
            default=argparse.SUPPRESS,
            metavar="V",
            help=f"{help_text} ({shown})" if help_text else f"({shown})",
        )


def config_layer(args: argparse.Namespace) -> dict:
    """The nested mapping of every config flag given on the command line."""
    given = {k.removeprefix("cfg:"): v for k, v in vars(args).items() if k.startswith("cfg:")}
    for key, v in given.items():
        if isinstance(v, str) and v.lower() in ("none", "null"):
            given[key] = None
    try:
        return nest(given)
    except (TypeError, ValueError) as e:  # pragma: no cover - nest only splits strings
        raise ConfigError(str(e)) from None
