"""The command line of a flat config dataclass (train.py's Config): `--field value` overrides, `--help` lists
every field with its default and the one-line comment written next to it in the dataclass source; values the
dataclass refuses at construction exit with its message."""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import io
import json
import shlex
import sys
import tokenize
import typing


class ConfigError(SystemExit):
    pass


def field_comments(cls) -> dict[str, str]:
    """{field: comment} from `name: type = default  # comment` lines of the class source."""
    comments = {}
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return comments
    pending = None
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 4 and pending is None:
            pending = (tok.string, tok.start[0])
        elif tok.type == tokenize.COMMENT and pending and tok.start[0] == pending[1]:
            comments[pending[0]] = tok.string.lstrip("#").strip()
        if tok.type in (tokenize.NEWLINE, tokenize.NL):
            pending = None
    return comments


def _parse_value(name: str, text: str, typ):
    origin = typing.get_origin(typ)
    if origin is typing.Literal:
        choices = typing.get_args(typ)
        if text not in choices:
            raise ConfigError(f"--{name}: {text!r} is not one of {', '.join(map(str, choices))}")
        return text
    if typ is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--{name}: expected true or false, got {text!r}")
    if typ in (int, float):
        try:
            return typ(text)
        except ValueError:
            raise ConfigError(f"--{name}: expected {typ.__name__}, got {text!r}") from None
    return text


def help_text(cls, prog: str, recipes: dict[str, dict] | None = None) -> str:
    comments = field_comments(cls)
    hints = typing.get_type_hints(cls, include_extras=True)
    lines = [f"usage: {prog} [--field value ...]", "", (cls.__doc__ or "").strip(), "", "options:"]
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        kind = "|".join(map(str, typing.get_args(typ))) if typing.get_origin(typ) is typing.Literal else typ.__name__
        flag = "--" + f.name.replace("_", "-")
        lines.append(f"  {flag} {kind.upper() if kind in ('int', 'float', 'str') else kind}  "
                     f"[default: {json.dumps(f.default)}]")
        lines.append(f"      {comments.get(f.name, '')}")
    if recipes:
        lines += ["", "recipes (--recipe NAME sets these values; explicit flags win, in any order):"]
        for name, values in recipes.items():
            lines.append(f"  {name}: " + " ".join(f"--{k.replace('_', '-')} {shlex.quote(str(v))}"
                                                for k, v in values.items()))
    return "\n".join(lines)


def parse_config(cls, argv: list[str] | None = None, prog: str = "train.py", recipes: dict[str, dict] | None = None):
    """Build `cls` from `--field value` / `--field=value` pairs (dashes or underscores; a bare `--flag` sets a
    bool to true). Unknown flags and bad values exit with a message that says what to do.
    recipes {name: {field: value}}: `--recipe NAME` (cls needs a `recipe` field) starts from those values instead
    of the defaults; every flag given explicitly overrides them, before or after --recipe."""
    argv = sys.argv[1:] if argv is None else list(argv)
    hints = typing.get_type_hints(cls, include_extras=True)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(help_text(cls, prog, recipes))
            raise SystemExit(0)
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: options look like --field value (see --help)")
        key, eq, inline = arg[2:].partition("=")
        name = key.replace("-", "_")
        if name not in hints:
            initials = "".join(word[:1] for word in name.split("_"))  # learning_rate -> lr
            close = [initials] if initials in names else difflib.get_close_matches(name, names, n=1, cutoff=0.5)
            hint = f"; did you mean --{close[0].replace('_', '-')}?" if close else "; see --help for the options"
            raise ConfigError(f"unknown option --{key}{hint}")
        typ = hints[name]
        if eq:
            text = inline
        elif typ is bool and (i + 1 >= len(argv) or argv[i + 1].startswith("--")):
            text = "true"
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"--{key} needs a value (see --help)")
            i += 1
            text = argv[i]
        values[name] = _parse_value(key, text, typ)
        i += 1
    if values.get("recipe"):
        if values["recipe"] not in (recipes or {}):
            raise ConfigError(f"--recipe: unknown recipe {values['recipe']!r}; choose from: "
                              f"{', '.join(recipes or {}) or '(none defined)'}")
        values = {**recipes[values["recipe"]], **values}
    try:
        return cls(**values)  # the dataclass checks its values at construction (__post_init__)
    except ValueError as e:
        raise ConfigError(f"bad configuration: {e}") from None


def config_to_json(config) -> str:
    return json.dumps(dataclasses.asdict(config), indent=2)

