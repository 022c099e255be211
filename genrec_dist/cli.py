"""What every job shares: ``--config FILE`` plus ``key=value`` overrides, printed and saved, and one error contract
(:func:`main`): a :class:`~genrec_dist.errors.GenrecError` ends the job with one line, anything else with its
traceback."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from genrec_dist.config import Config, ConfigError, check_ray_job_paths, load_config, marked_fields
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


def job_parser(job: str, description: str, run: bool | str = False) -> argparse.ArgumentParser:
    """The job's command line: ``--config``, ``key=value`` overrides, its shorthand flag, and with ``run`` the
    ``--run`` of the jobs that use a trained run (evaluate, recommend, serve; a string: its help)."""
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
    if run:
        parser.add_argument("--run", required=True, help=run if isinstance(run, str) else (
            "a run dir, a run name or the MLflow run id of a training run; without --config the run's own saved "
            "config (config.yaml in its run dir) is used, the overrides on top"))
    return parser


def load_job_config(args: argparse.Namespace, job: str, quiet: bool = False) -> Config:
    """The job's config (:class:`ConfigError` when it does not fit), its source said in one line unless ``quiet``
    (the whole resolved config goes to the run's files and MLflow, not the console). A shorthand flag (``--model
    car``) joins ``args.overrides`` as its override, last, so it wins over a ``model=`` beside it."""
    if getattr(args, "shorthand", None) is not None:
        args.overrides.append(f"{shorthand(job)[1]}={args.shorthand}")
    cfg = load_config(args.config, args.overrides, default_section=job)
    check_ray_job_paths(cfg)
    if not quiet:
        _say_config(job, args.config or "the defaults", args.overrides)
    return cfg


def load_run_job_config(args: argparse.Namespace, job: str) -> tuple[Config, str]:
    """``(config, run dir)`` of a job that uses the trained run ``--run`` names (the one resolver:
    :func:`genrec_dist.runs.find.resolve_run`): without ``--config``, the run's own saved config with the overrides
    on top."""
    from genrec_dist.runs.find import resolve_run

    cfg = load_config(args.config, args.overrides, default_section=job)
    cfg, run_dir, source = resolve_run(cfg, args.run, args.overrides, job, own_config=args.config is None)
    check_ray_job_paths(cfg)
    _say_config(job, args.config or source or "the defaults (the run saved no config)", args.overrides)
    return cfg, run_dir


def _say_config(job: str, source: str, overrides: list[str]) -> None:
    extra = f" + {len(overrides)} override{'s' * (len(overrides) != 1)}" if overrides else ""
    kept = "MLflow's params and the run's config.yaml" if job == "train" else "MLflow's params"
    print(f"{job}: config {source}{extra} (the whole resolved config: {kept})", flush=True)
