"""The command-line entry of train.py and sample.py: mistakes Hydra meets before our code runs, as one line.

Hydra parses the overrides and creates the run folder before it calls `main(cfg)`, and reports what fails
there with its own text (a lexer error without a hint, a traceback of `mkdir`). `run(main)` checks the
overrides with Hydra's own parser first; `RunDirCheck` (a Hydra callback listed in conf/hydra/default.yaml
and conf/sample.yaml) checks the run folder after composition and before Hydra creates it. Both print
`error: ...` and exit 2, as `ldm.training.runtime.user_errors_exit` does for errors raised later.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
from collections.abc import Callable
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ldm.config_checks import CONF_DIR, dir_problem

_INTERPOLATION = re.compile(r"^\$\{([\w.]+)\}$")  # a value that is exactly one plain interpolation


# `--help` lists only the config groups a script reads (Hydra's default lists every folder of conf/).
SCRIPT_GROUPS = {
    "train": ("experiment", "data", "data/task", "model", "optim", "trainer", "callbacks", "logger", "paths",
              "sampler"),  # sampler: the preview / validation sampler of stage-2 models
    "sample": ("task", "sampler"),
}  # fmt: skip


def help_groups(script: str) -> str:
    """`group: option, option` lines of the config groups `script` (train | sample) reads."""
    lines = []
    for group in SCRIPT_GROUPS[script]:
        options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        lines.append(f"{group}: {', '.join(options)}")
    return "\n".join(lines)


if not OmegaConf.has_resolver("ldm_help_groups"):
    OmegaConf.register_new_resolver("ldm_help_groups", help_groups)


def fail(message: str) -> None:
    """Print one `error:` line and exit 2 (SystemExit passes through Hydra's error reporting)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def run(
    main: Callable[[], Any],
    argv: list[str] | None = None,
    required: dict[str, str] | None = None,  # override key -> the one line when the command line lacks it
) -> None:
    """Check the command line's overrides, then call the `@hydra.main` function as usual."""
    argv = sys.argv[1:] if argv is None else argv
    problem = override_problem(argv) or missing_override(argv, required or {})
    if problem is not None:
        fail(problem)
    main()


def missing_override(argv: list[str], required: dict[str, str]) -> str | None:
    """The message of the first required key no override sets (Hydra's flags such as --help: none)."""
    if any(a.startswith("-") for a in argv):
        return None
    keys = {o.split("=", 1)[0].lstrip("+~") for o in _overrides(argv)}
    return next((message for key, message in required.items() if key not in keys), None)


def _overrides(argv: list[str]) -> list[str]:
    """The overrides among argv, as Hydra's own argument parser splits them ([] on --help and the like)."""
    from hydra._internal.utils import get_args_parser

    sink = io.StringIO()
    try:  # Hydra parses again and prints any usage error or help itself
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            args = get_args_parser().parse_args(argv)
    except SystemExit:
        return []
    return list(args.overrides or [])


def override_problem(argv: list[str]) -> str | None:
    """One line on the first override Hydra's grammar rejects, with the quoting that fixes it; else None."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    for override in _overrides(argv):
        try:
            parser.parse_overrides([override])
        except OverrideParseException as e:
            return explain_override(override, str(e))
    return None


def explain_override(override: str, hydra_message: str) -> str:
    """`<override>: <what Hydra cannot read>; <the quoted override to type instead>`."""
    key, sep, value = override.partition("=")
    if not sep:
        return (
            f"{override!r} is not an override: write key=value (e.g. steps=20), +key=value to add a key "
            "or ~key to delete one."
        )
    bad = _offending_char(override, hydra_message)
    what = (
        f"Hydra's override syntax does not allow {bad!r} in an unquoted value"
        if bad
        else (f"Hydra cannot parse it ({hydra_message.strip().splitlines()[0]})")
    )
    if '"' in value and "'" not in value:  # Hydra's single quotes, inside the shell's double quotes
        quoted = '"' + key + "='" + value.replace('"', '\\"') + "'\""
    else:
        quoted = "'" + key + '="' + value.replace('"', '\\"') + "\"'"
    return f"{override}: {what}; quote the value for Hydra inside the shell's quotes: {quoted}"


def _offending_char(override: str, hydra_message: str) -> str | None:
    """The character under Hydra's `^` marker (its message repeats the override, then marks a column)."""
    lines = hydra_message.splitlines()
    for i, line in enumerate(lines[:-1]):
        start = line.find(override)
        caret = lines[i + 1].find("^")
        if start >= 0 and caret >= start and caret - start < len(override):
            return override[caret - start]
    return None


class RunDirCheck(Callback):
    """Hydra callback: an unusable run folder (a file, read-only) fails as one line before Hydra's mkdir."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.sweep.dir")

    @staticmethod
    def _check(config: DictConfig, key: str) -> None:
        path = OmegaConf.select(config, key, default=None)
        if path in (None, ""):
            return
        problem = dir_problem(str(path))
        if problem is not None:
            fail(f"{user_key(config, key)}={path}: {problem}")


class ConfigCheck(Callback):
    """Hydra callback: the config checks (`ldm.config_checks`) before Hydra makes the run folder, so a
    mistake leaves nothing behind. `check` is the dotted path of check_train_config / check_sample_config."""

    def __init__(self, check: str) -> None:
        self.check = check

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        import importlib

        from ldm.errors import UserError

        module, _, name = self.check.rpartition(".")
        try:
            getattr(importlib.import_module(module), name)(config)
        except UserError as e:
            fail(str(e))


def user_key(config: DictConfig, key: str) -> str:
    """The key the user sets for `key`: `hydra.run.dir: ${out_dir}` -> out_dir (followed while it is one
    plain interpolation, e.g. train.py's hydra.run.dir -> paths.output_dir)."""
    seen = {key}
    while True:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(config, parent) if parent else config
        try:
            raw = node._get_node(leaf)._value()  # the value before interpolation
        except Exception:  # noqa: BLE001 - any odd node: keep the key we have
            return key
        match = _INTERPOLATION.match(str(raw))
        if not match or match.group(1) in seen:
            return key
        key = match.group(1)
        seen.add(key)
