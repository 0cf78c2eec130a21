"""What a command's `--help` says about its config: every key with its value and meaning.

The meanings are not written twice: a key's meaning is the comment on its line
in the config file (`config.limit = ...  # first N examples only`), else the
comment lines right above it, looked up in the file and then in the shipped
configs it builds on (`from tome_jax.configs import eval_cifar10`). A method's
settings (`config.<method>.<setting>`) mean what the "Settings:" section of the
method's docstring in `tome_jax.reduce` says.
"""

from __future__ import annotations

import ast
import io
import pathlib
import re
import textwrap
import tokenize
from typing import Any

from tome_jax import reduce

CONFIGS = pathlib.Path(__file__).resolve().parent / "configs"
# The packages a config file imports shipped configs from (`configs` is the repository's link).
CONFIG_PACKAGES = ("tome_jax.configs", "configs")
WIDTH = 100


def _comments(source: str) -> dict[int, str]:
    """{line number: the text of the comment on that line}."""
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return {token.start[0]: token.string.lstrip("#").strip() for token in tokens if token.type == tokenize.COMMENT}


def _config_key(target: ast.expr) -> str | None:
    """"model_overrides.depth" for the target `config.model_overrides.depth`, else None."""
    parts = []
    while isinstance(target, ast.Attribute):
        parts.append(target.attr)
        target = target.value
    if isinstance(target, ast.Name) and target.id == "config" and parts:
        return ".".join(reversed(parts))
    return None


def _imported_configs(tree: ast.Module) -> list[pathlib.Path]:
    """The shipped config files a config module imports."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in CONFIG_PACKAGES:
            found += [CONFIGS / f"{alias.name}.py" for alias in node.names]
    return [path for path in found if path.is_file()]


def config_meanings(path: str | pathlib.Path) -> dict[str, str]:
    """{dotted key: meaning} from the comments of the config file at `path` and of the
    shipped configs it imports; the file's own comment wins over the one it builds on."""
    meanings: dict[str, str] = {}
    pending, seen = [pathlib.Path(path)], set()
    while pending:
        path = pending.pop(0).resolve()
        if path in seen:
            continue
        seen.add(path)
        source = path.read_text()
        tree = ast.parse(source)
        comments = _comments(source)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Assign):
                continue
            lines = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
            if not lines:  # the comment block right above, up to a blank or code line
                above = node.lineno - 1
                while above in comments and source.splitlines()[above - 1].lstrip().startswith("#"):
                    lines.insert(0, comments[above])
                    above -= 1
            for key in filter(None, map(_config_key, node.targets)):
                if lines:
                    meanings.setdefault(key, " ".join(lines))
        pending += _imported_configs(tree)
    return meanings


def setting_meanings(method: type[reduce.Reduction]) -> dict[str, str]:
    """{setting: meaning} from the "Settings:" section of the method's docstring; an entry
    naming several settings (`tau_sim, tau_info, tau_size: ...`) means each of them."""
    doc = textwrap.dedent("\n".join((method.__doc__ or "").splitlines()[1:]))
    section = re.search(r"^Settings:\n((?:[ \t]+\S.*\n?|\n)*)", doc, re.MULTILINE)
    meanings = {}
    if section:
        for entry in re.split(r"\n(?=\S)", textwrap.dedent(section.group(1)).strip()):
            names, _, meaning = entry.partition(":")
            for name in names.split(","):
                meanings[name.strip()] = " ".join(meaning.split())
    return meanings


def _entry(flag: str, meaning: str) -> str:
    """The flag (`--config.KEY=VALUE`) and its meaning indented under it."""
    indent = " " * 6
    return f"  {flag}\n" + textwrap.fill(meaning, WIDTH, initial_indent=indent, subsequent_indent=indent)


def config_help(config, path: str | pathlib.Path) -> str:
    """The keys of `config` (an ml_collections ConfigDict read from `path`), each with its
    value and meaning, then each method's settings."""
    meanings = config_meanings(path)
    lines = [f"config keys ({path}; set any with --config.KEY=VALUE):"]
    methods = []
    for key, value in config.items():
        if key in reduce.METHODS:
            methods.append(key)
        elif hasattr(value, "items"):  # a section: set values shown, the rest named
            given = ", ".join(f"{k}={v!r}" for k, v in value.items() if v is not None)
            unset = ", ".join(k for k, v in value.items() if v is None)
            meaning = " ".join(
                filter(None, [meanings.get(key, ""), f"Set: {given}." if given else "", f"Unset: {unset}." if unset else ""])
            )
            lines.append(_entry(f"--config.{key}.KEY=VALUE", meaning))
        else:
            lines.append(_entry(f"--config.{key}={value!r}", meanings.get(key, "")))
    if methods:
        settings = {method: dict(config[method].items()) for method in methods}
        lines += ["", *methods_help(settings, "--config.{method}.{key}={value!r}")]
    return "\n".join(lines)


def methods_help(settings: dict[str, dict[str, Any]], flag: str) -> list[str]:
    """{method: {setting: value}} as lines, each setting's flag (`flag` formatted with
    `method`, `key` and `value`) and its meaning; a method runs with its own settings only."""
    lines = [f"methods: {', '.join(reduce.METHODS)}; each runs with its own settings:"]
    for method, values in settings.items():
        meanings = setting_meanings(reduce.METHODS[method])
        lines += [_entry(flag.format(method=method, key=key, value=value), meanings.get(key, "")) for key, value in values.items()]
    return lines
