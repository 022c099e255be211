"""The layering rule, checked so it cannot drift: an AST scan of EVERY module in ``genrec_dist/``, ``tokenization/``
and ``jobs/`` against an explicit table of which group may import which. ``tokenization`` depends on ``genrec_dist``,
never the reverse; nothing imports ``jobs``; the pure core (settings, data formats, models, metrics, k-means) never
imports ``ray``, ``deepspeed``, ``mlflow`` or ``torch.distributed``. Imports inside functions count (they run);
imports under ``if TYPE_CHECKING:`` do not (they never run). A module the scan cannot parse is a failure.

A second test imports the core for real with the engines made unimportable, so the table cannot be wrong about it.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys

from _util import REPO

PACKAGES = ("genrec_dist", "tokenization", "jobs")

# Module groups, by dotted-name prefix (the longest prefix wins).
GROUPS = {
    "genrec_dist": "root",  # the package's own __init__ only (a new top-level module must be placed in the table)
    "genrec_dist.errors": "errors",
    "genrec_dist.data.config": "settings",
    "genrec_dist.models.config": "settings",
    "genrec_dist.training.config": "train_settings",  # train.model's choices are the model registry's
    "genrec_dist.tokenize_config": "settings",
    "genrec_dist.storage": "storage",
    "genrec_dist.spool": "storage",
    "genrec_dist.config": "config",
    "genrec_dist.cli": "cli",
    "genrec_dist.data": "data",
    "genrec_dist.models": "models",
    "genrec_dist.evaluation": "metrics",
    "genrec_dist.evaluation.run": "evaluate_run",
    "genrec_dist.evaluation.recommend": "evaluate_run",  # the Recommender loads a run's export, as run.py does
    "genrec_dist.reports": "reports",
    "genrec_dist.tracking": "tracking",
    "genrec_dist.serving": "serving",  # a run's export as an MLflow pyfunc model
    "genrec_dist.serve_request": "serve_request",  # one online request and its answer (both servers)
    "genrec_dist.ray_serve": "ray_serve",  # the same model on Ray Serve (jobs/serve.py)
    "genrec_dist.ray_runtime": "ray_runtime",
    "genrec_dist.ray_recommend": "recommend",
    # what a run leaves on disk: below both training and evaluating a run (the examples it reads are data)
    "genrec_dist.training.runs": "run_files",
    "genrec_dist.training.export": "run_files",
    "genrec_dist.training.checkpoint": "run_files",
    "genrec_dist.training": "training",
    "tokenization": "tokenization",
    "tokenization.kmeans": "tokenization_core",
    "tokenization.balanced": "tokenization_core",
    "tokenization.collision_free": "tokenization_core",
    "tokenization.embed": "tokenization_core",
    "tokenization.embedding_store": "tokenization_core",
    "tokenization.progress": "tokenization_core",
    "tokenization.config": "tokenization_core",
    "jobs": "jobs",
}

_BASE = {"root", "errors", "settings"}
_CORE = _BASE | {"train_settings", "storage", "config", "data", "models", "metrics", "reports"}
# group -> the other groups it may import (its own group is always allowed). No group lists "jobs", and no
# genrec_dist group lists a tokenization group. Only the jobs make trackers: the engines (training, tokenization) get
# theirs from the job, so they may not import tracking; evaluating a run reads tracking's run lookup.
ALLOWED = {
    "root": set(),
    "errors": set(),
    "settings": {"root", "errors"},
    "train_settings": {"root", "errors", "settings", "models"},
    "storage": _BASE,
    "config": _BASE | {"train_settings", "models"},
    "cli": _BASE | {"config", "train_settings", "models"},
    "data": _BASE | {"storage"},
    "models": _BASE,
    "metrics": _BASE,
    "reports": _BASE | {"metrics"},
    "tracking": _BASE | {"storage", "config"},
    "ray_runtime": _BASE,
    "run_files": _BASE | {"train_settings", "storage", "config", "data", "models"},
    "evaluate_run": _CORE | {"tracking", "run_files", "serve_request"},  # the one left_pad of model inputs
    # the export as an MLflow model, saved by training for the tracker to log
    "serving": _CORE | {"run_files", "evaluate_run", "serve_request"},
    "serve_request": _BASE,
    "ray_serve": _CORE | {"cli", "tracking", "run_files", "evaluate_run", "ray_runtime", "serve_request"},
    "training": _CORE | {"run_files", "evaluate_run", "ray_runtime", "serving"},
    "recommend": _CORE | {"cli", "tracking", "run_files", "evaluate_run", "ray_runtime"},
    "tokenization_core": _BASE | {"storage"},
    "tokenization": _CORE | {"run_files", "ray_runtime", "tokenization_core"},
    "jobs": _CORE | {"cli", "tracking", "run_files", "evaluate_run", "training", "ray_runtime", "recommend", "ray_serve",
                     "tokenization", "tokenization_core"},
}

ENGINES = ("ray", "deepspeed", "mlflow", "torch.distributed")
# Groups that must run with none of the engines installed: the pure core.
ENGINE_FREE = {"root", "errors", "settings", "train_settings", "storage", "config", "data", "models", "metrics",
               "reports", "tokenization_core", "serve_request"}


def group_of(module: str) -> str | None:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        name = ".".join(parts[:n])
        if name in GROUPS and (name != "genrec_dist" or module == name):
            return GROUPS[name]
    return None


def module_files(root: str) -> dict[str, str]:
    """Dotted module name -> file, for every .py file under the scanned packages of ``root``."""
    out = {}
    for pkg in PACKAGES:
        for folder, dirs, files in os.walk(os.path.join(root, pkg)):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(files):
                if name.endswith(".py"):
                    rel = os.path.relpath(os.path.join(folder, name), root)[:-3].split(os.sep)
                    if rel[-1] == "__init__":
                        rel = rel[:-1]
                    out[".".join(rel)] = os.path.join(folder, name)
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> list[tuple[int, str]]:
    """(line, imported module) for every import that runs, relative ones resolved; ``from a import b`` names the
    module ``a.b`` when that is a module of the scan, else ``a``."""
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = module.split(".") if is_package else module.split(".")[:-1]
                here = here[: len(here) - (node.level - 1)]
                base = ".".join(here + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((node.lineno, sub if sub in known else base))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def violations(root: str) -> list[str]:
    """Every import of the scanned packages under ``root`` that breaks the table, plus every module that does not
    parse or belongs to no group; one line each, naming the file and line."""
    files = module_files(root)
    known = set(files)
    problems = []
    for module, path in sorted(files.items()):
        rel = os.path.relpath(path, root)
        group = group_of(module)
        if group is None:
            problems.append(f"{rel}: module {module} belongs to no group of the layering table")
            continue
        try:
            with open(path, encoding="utf-8") as fh:
                tree = ast.parse(fh.read(), filename=path)
        except (SyntaxError, UnicodeDecodeError, ValueError) as exc:
            problems.append(f"{rel}: cannot be parsed ({exc})")
            continue
        for line, target in imports_of(tree, module, path.endswith("__init__.py"), known):
            if group in ENGINE_FREE and any(target == e or target.startswith(e + ".") for e in ENGINES):
                problems.append(f"{rel}:{line}: {group} module imports the engine {target}")
            top = target.split(".")[0]
            if top not in PACKAGES:
                continue
            other = group_of(target)
            if other is None:
                problems.append(f"{rel}:{line}: imports {target}, which belongs to no group")
            elif other != group and other not in ALLOWED[group]:
                problems.append(f"{rel}:{line}: {group} module {module} may not import {target} ({other})")
    return problems


def test_every_module_follows_the_table():
    files = module_files(REPO)
    assert "genrec_dist.models.car" in files and "tokenization.kmeans" in files and "jobs.train" in files
    assert violations(REPO) == []


def _tree_copy(tmp_path) -> str:
    root = str(tmp_path / "repo")
    for pkg in PACKAGES:
        shutil.copytree(os.path.join(REPO, pkg), os.path.join(root, pkg),
                        ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _plant(root: str, rel: str, text: str) -> None:
    with open(os.path.join(root, rel), "a", encoding="utf-8") as fh:
        fh.write(text)


def test_planted_reverse_imports_fail(tmp_path):
    root = _tree_copy(tmp_path)
    assert violations(root) == []
    _plant(root, "genrec_dist/config.py", "\nfrom tokenization.kmeans import KMeansParams\n")
    _plant(root, "genrec_dist/models/sasrec.py", "\ndef _late():\n    from genrec_dist.training import dist\n")
    _plant(root, "genrec_dist/evaluation/metrics.py", "\nimport mlflow\n")
    _plant(root, "tokenization/pipeline.py", "\nfrom jobs import train\n")
    _plant(root, "genrec_dist/data/dataset.py", "\nfrom ..config import Config\n")  # relative, resolved
    found = "\n".join(violations(root))
    assert "genrec_dist/config.py" in found and "tokenization.kmeans" in found
    assert "genrec_dist/models/sasrec.py" in found and "genrec_dist.training.dist" in found
    assert "genrec_dist/evaluation/metrics.py" in found and "engine mlflow" in found
    assert "tokenization/pipeline.py" in found and "jobs.train" in found
    assert "genrec_dist/data/dataset.py" in found and "genrec_dist.config" in found
    assert len(violations(root)) == 5


def test_type_checking_imports_do_not_count_but_others_do(tmp_path):
    root = _tree_copy(tmp_path)
    _plant(root, "genrec_dist/models/tiger.py",
           "\nif TYPE_CHECKING:\n    from genrec_dist.training.runs import RunConfigError\n")
    assert violations(root) == []
    _plant(root, "genrec_dist/models/tiger.py",
           "\nif not TYPE_CHECKING:\n    from genrec_dist.training.runs import RunConfigError\n")
    assert len(violations(root)) == 1


def test_unreadable_or_unknown_module_is_a_failure_not_a_skip(tmp_path):
    root = _tree_copy(tmp_path)
    _plant(root, "genrec_dist/models/blocks.py", "\ndef broken(:\n")
    with open(os.path.join(root, "genrec_dist", "extra.py"), "w") as fh:
        fh.write("x = 1\n")
    found = violations(root)
    assert any("genrec_dist/models/blocks.py: cannot be parsed" in p for p in found), found
    assert any("genrec_dist/extra.py: module genrec_dist.extra belongs to no group" in p for p in found), found


def test_core_imports_without_engines():
    """The engine-free groups import for real with ``ray``, ``deepspeed`` and ``mlflow`` unimportable."""
    core = sorted(m for m in module_files(REPO) if group_of(m) in ENGINE_FREE)
    probe = (
        "import importlib, sys\n"
        "for name in ('ray', 'deepspeed', 'mlflow'):\n"
        "    sys.modules[name] = None\n"
        f"for name in {core!r}:\n"
        "    importlib.import_module(name)\n"
        "print('IMPORTED', len(" + repr(core) + "))\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"IMPORTED {len(core)}" in proc.stdout
    assert "genrec_dist.models.car" in core and "genrec_dist.evaluation.metrics" in core
