"""What every job's command line shares: ``--config FILE`` plus ``key=value`` overrides, printed and saved."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from genrec_dist.config import Config, ConfigError, load_config, to_yaml


# The one setting that picks what a job does, also as a flag (SPEC: ``jobs/train.py ... --model car``,
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
        parser.add_argument(f"--{flag}", dest="shorthand", default=None, help=f"the same as the override {key}=...")
    return parser


def load_job_config(args: argparse.Namespace, job: str, quiet: bool = False) -> Config:
    """Load and print the resolved config; a config error exits with its message, not a stack trace. A shorthand
    flag (``--model car``) joins ``args.overrides`` as its override, last, so it wins over a ``model=`` beside it."""
    if getattr(args, "shorthand", None) is not None:
        args.overrides.append(f"{SHORTHANDS[job][1]}={args.shorthand}")
    try:
        cfg = load_config(args.config, args.overrides, default_section=job)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if not quiet:
        print(f"# resolved config ({job})\n{to_yaml(cfg)}", flush=True)
    return cfg


def fail(message: str, code: int = 1) -> Any:
    """End a job with a one-line error (bad input), never a deep stack trace."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)
