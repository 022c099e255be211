"""What every job shares: ``--config FILE`` plus ``key=value`` overrides, printed and saved, and one error contract
(:func:`main`): a :class:`~genrec_dist.errors.GenrecError` ends the job with one line, anything else with its
traceback."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable

from genrec_dist.config import (Config, ConfigError, get_dotted, load_config, marked_fields, to_yaml,
                                with_resolved_paths)
from genrec_dist.errors import GenrecError


def main(job: Callable[[], Any]) -> None:
    """Run a job's body. A user-facing error (:class:`GenrecError`: bad input, config, storage, tracking server...)
    prints one line, ``config error: ...`` (exit 2) or ``error: ...`` (exit 1); any other exception is a bug and
    keeps its traceback."""
    try:
        job()
    except GenrecError as exc:
        prefix = "config error" if isinstance(exc, ConfigError) else "error"
        lines = str(exc).splitlines() or [type(exc).__name__]
        print(f"{prefix}: {lines[0]}", file=sys.stderr, flush=True)
        raise SystemExit(exc.exit_code) from None


def shorthand(job: str) -> tuple[str, str] | None:
    """The one setting that picks what a job does, also as a flag (``jobs/train.py ... --model car``,
    ``jobs/tokenize.py ... --method unger``; ``shorthand`` in its field's metadata): ``(flag, dotted key)``."""
    own = [n for n in marked_fields(Config, "shorthand", True) if n.startswith(job + ".")]
    return (own[0].split(".", 1)[1], own[0]) if own else None


def job_parser(job: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"jobs/{job}.py",
        description=description,
        epilog=f"Overrides are dotted keys: 'prepare.k_core=3', 'seed=1'; a bare key means '{job}.<key>'.",
    )
    parser.add_argument("--config", default=None, help="YAML config (configs/*.yaml); defaults only when omitted")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    if shorthand(job):
        flag, key = shorthand(job)
        parser.add_argument(f"--{flag}", dest="shorthand", metavar=flag.upper(), default=None,
                            help=f"the same as the override {key}=...")
    return parser


def load_job_config(args: argparse.Namespace, job: str, quiet: bool = False) -> Config:
    """Load and print the resolved config (:class:`ConfigError` when it does not fit). A shorthand flag
    (``--model car``) joins ``args.overrides`` as its override, last, so it wins over a ``model=`` beside it."""
    if getattr(args, "shorthand", None) is not None:
        args.overrides.append(f"{shorthand(job)[1]}={args.shorthand}")
    cfg = load_config(args.config, args.overrides, default_section=job)
    check_ray_job_paths(cfg)
    if not quiet:
        print(f"# resolved config ({job})\n{to_yaml(cfg)}", flush=True)
    return cfg


def ray_job_working_dir() -> str | None:
    """The ``working_dir`` of the Ray job this process is the driver of (``ray job submit --working-dir``), else
    ``None``. Ray's job supervisor hands the driver its job config (runtime_env included) in this variable."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    try:
        return ((json.loads(raw) if raw else {}).get("runtime_env") or {}).get("working_dir") or None
    except (ValueError, AttributeError):
        return None


def check_ray_job_paths(cfg: Config) -> None:
    """Under ``ray job submit --working-dir`` the driver runs in a temporary copy of that directory on the head, so a
    relative output location would be written into the copy and lost with it: refuse it, naming each one."""
    if ray_job_working_dir() is None:
        return
    # the locations jobs write (``output`` in their fields' metadata), paths.* as derived from workdir
    resolved = with_resolved_paths(cfg)
    places = {name: get_dotted(resolved, name) for name in marked_fields(Config, "output", True)}
    relative = [f"{k}={v}" for k, v in places.items() if v and "://" not in v and not os.path.isabs(v)]
    if relative:
        raise ConfigError(f"running as a Ray job with a working_dir (ray job submit --working-dir), which runs in a "
                          f"temporary copy of that directory: {', '.join(relative)} would be written there and lost; "
                          "give absolute paths every node sees (shared storage) or s3://")
