"""What every job's command line shares: ``--config FILE`` plus ``key=value`` overrides, printed and saved."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from genrec_dist.config import Config, ConfigError, load_config, to_yaml


# The one setting that picks what a job does, also as a flag (``jobs/train.py ... --model car``,
# ``jobs/tokenize.py ... --method unger``): the same as the override ``model=car``.
SHORTHANDS = {"train": ("model", "train.model"), "tokenize": ("method", "tokenize.method")}


def job_parser(job: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"jobs/{job}.py",
        description=description,
        epilog=f"Overrides are dotted keys: 'prepare.k_core=3', 'seed=1'; a bare key means '{job}.<key>'.",
    )
    parser.add_argument("--config", default=None, help="YAML config (configs/*.yaml); defaults only when omitted")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    if job in SHORTHANDS:
        flag, key = SHORTHANDS[job]
        parser.add_argument(f"--{flag}", dest="shorthand", metavar=flag.upper(), default=None,
                            help=f"the same as the override {key}=...")
    return parser


def load_job_config(args: argparse.Namespace, job: str, quiet: bool = False) -> Config:
    """Load and print the resolved config; a config error exits with its message, not a stack trace. A shorthand
    flag (``--model car``) joins ``args.overrides`` as its override, last, so it wins over a ``model=`` beside it."""
    if getattr(args, "shorthand", None) is not None:
        args.overrides.append(f"{SHORTHANDS[job][1]}={args.shorthand}")
    try:
        cfg = load_config(args.config, args.overrides, default_section=job)
        check_ray_job_paths(cfg)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
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
    places = {"workdir": cfg.workdir, "paths.dataset": cfg.dataset_dir, "paths.semantic_ids": cfg.semantic_ids_dir,
              "paths.runs": cfg.runs_dir, "train.checkpoint_dir": cfg.train.checkpoint_dir}
    relative = [f"{k}={v}" for k, v in places.items() if v and "://" not in v and not os.path.isabs(v)]
    if relative:
        raise ConfigError(f"running as a Ray job with a working_dir (ray job submit --working-dir), which runs in a "
                          f"temporary copy of that directory: {', '.join(relative)} would be written there and lost; "
                          "give absolute paths every node sees (shared storage) or s3://")


def fail(message: str, code: int = 1) -> Any:
    """End a job with a one-line error (bad input), never a deep stack trace."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)
