"""The layering rule, checked so it cannot drift: an AST scan of EVERY module in ``genrec_dist/``, ``tokenization/``
and ``jobs/``. A module's group is what the folders say: the package it sits in under ``genrec_dist/`` (``runs``,
``training``, ...) or its own name for a top-level module (``storage``, ``cli``, ...); every package's ``config``
module and every top-level ``*_config`` module is ``settings`` (a section's fields, below everything). The groups stand in layers, bottom first, and a
module may import its own group or a group of a lower layer only: so no two groups import each other, and no
folder-level circle can form. A second rule: **no import circle between modules** (deferred imports inside
functions count, as they run; imports under ``if TYPE_CHECKING:`` do not, as they never run). The pure core
(settings, data formats, models, metrics, k-means) never imports ``ray``, ``deepspeed``, ``mlflow`` or
``torch.distributed``. A module the scan cannot parse is a failure.

A last test imports the core for real with the engines made unimportable, so the table cannot be wrong about it.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys

from _util import REPO

PACKAGES = ("genrec_dist", "tokenization", "jobs")

# The layers, bottom first: a group imports its own group or any group of a lower layer.
LAYERS = (
    ("genrec_dist", "errors"),                       # the package's own __init__; the error base
    ("models", "serve_request", "ray_runtime"),      # the models and their registry; one online request
    ("settings",),                                   # every other package's config module (dataclass sections)
    ("storage", "spool"),
    ("config", "data"),                              # the whole Config; data formats
    ("reports", "tracking"),
    ("runs",),                                       # a run's files: run dir, checkpoints, export, --run resolver
    ("evaluation", "cli"),                           # metrics, a split scored, the evaluate job's loop; job args
    ("serving", "ray_recommend", "tokenization_core"),
    ("training", "ray_serve", "tokenization"),
    ("jobs",),
)
GROUP_LAYER = {group: n for n, layer in enumerate(LAYERS) for group in layer}
# tokenization/'s pure modules (k-means and the embedding store): the core of the tokenizer, below its Ray pipeline.
TOKENIZATION_CORE = {"kmeans", "kmeans_call", "balanced", "collision_free", "embed", "embedding_store", "progress",
                     "config"}
ENGINES = ("ray", "deepspeed", "mlflow", "torch.distributed")
# Groups that must run with none of the engines installed: the pure core.
ENGINE_FREE = {"genrec_dist", "errors", "settings", "storage", "spool", "models", "serve_request", "config", "data",
               "reports", "runs", "evaluation", "tokenization_core"}


def group_of(module: str) -> str | None:
    """The group a dotted module name belongs to (None: outside the scanned packages)."""
    parts = module.split(".")
    if parts[0] == "jobs":
        return "jobs"
    if parts[0] == "tokenization":
        return "tokenization_core" if len(parts) > 1 and parts[1] in TOKENIZATION_CORE else "tokenization"
    if parts[0] != "genrec_dist":
        return None
    if len(parts) == 1:
        return "genrec_dist"
    if (len(parts) > 2 and parts[-1] == "config" and parts[1] != "models") or parts[-1].endswith("_config"):
        return "settings"  # (the models' own config is the registry's: the sections of training read it)
    return parts[1]


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


def _scan(root: str) -> tuple[dict[str, list[tuple[int, str]]], list[str]]:
    """``({module: [(line, imported module of the scanned packages or an engine)]}, problems)`` for every module
    under ``root``: problems are files that do not parse."""
    files = module_files(root)
    known = set(files)
    graph, problems = {}, []
    for module, path in sorted(files.items()):
        try:
            with open(path, encoding="utf-8") as fh:
                tree = ast.parse(fh.read(), filename=path)
        except (SyntaxError, UnicodeDecodeError, ValueError) as exc:
            problems.append(f"{os.path.relpath(path, root)}: cannot be parsed ({exc})")
            continue
        graph[module] = imports_of(tree, module, path.endswith("__init__.py"), known)
    return graph, problems


def violations(root: str) -> list[str]:
    """Every import of the scanned packages under ``root`` that breaks the layers, every engine import of the pure
    core, every module that does not parse or belongs to no layer, and every import circle; one line each, naming
    the file and line."""
    files = module_files(root)
    graph, problems = _scan(root)
    for module, imports in graph.items():
        rel = os.path.relpath(files[module], root)
        group = group_of(module)
        if group not in GROUP_LAYER:
            problems.append(f"{rel}: module {module} belongs to no group of the layers ({group})")
            continue
        for line, target in imports:
            if group in ENGINE_FREE and any(target == e or target.startswith(e + ".") for e in ENGINES):
                problems.append(f"{rel}:{line}: {group} module imports the engine {target}")
            if target.split(".")[0] not in PACKAGES:
                continue
            other = group_of(target)
            if other not in GROUP_LAYER:
                problems.append(f"{rel}:{line}: imports {target}, which belongs to no group")
            elif other != group and GROUP_LAYER[other] >= GROUP_LAYER[group]:
                problems.append(f"{rel}:{line}: {group} module {module} may not import {target} ({other}: "
                                f"{'the same' if GROUP_LAYER[other] == GROUP_LAYER[group] else 'a higher'} layer)")
    problems += [f"import circle: {' -> '.join(c)}" for c in circles(graph, files)]
    return problems


def circles(graph: dict[str, list[tuple[int, str]]], files: dict[str, str]) -> list[list[str]]:
    """Every import circle among the scanned modules, one per strongly connected component of the import graph
    (a package's ``__init__`` importing its own submodules is not a circle: the submodule importing the package
    back is how Python resolves ``from package import name``, so edges from a submodule to its own package are
    left out), each as the modules of one loop through it."""
    def parent_of(child: str, parent: str) -> bool:
        return child.startswith(parent + ".")

    edges = {m: sorted({t for _, t in imports if t in graph and t != m and not parent_of(m, t)})
             for m, imports in graph.items()}
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v: str) -> None:  # Tarjan's algorithm (the graph has a few hundred nodes)
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(_loop(sorted(comp), edges))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out


def _loop(comp: list[str], edges: dict[str, list[str]]) -> list[str]:
    """The shortest loop through a strongly connected component's first module (breadth first, inside it)."""
    inside, start = set(comp), comp[0]
    came: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in edges[v]:
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(came[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w in inside and w not in came:
                    came[w] = v
                    nxt.append(w)
        frontier = nxt
    return comp  # (unreachable for a strongly connected component)


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
    _plant(root, "genrec_dist/evaluation/evaluate.py", "\nimport mlflow\n")
    _plant(root, "tokenization/pipeline.py", "\nfrom jobs import train\n")
    _plant(root, "genrec_dist/data/dataset.py", "\nfrom ..config import Config\n")  # relative, resolved
    found = "\n".join(violations(root))
    assert "genrec_dist/config.py" in found and "tokenization.kmeans" in found
    assert "genrec_dist/models/sasrec.py" in found and "genrec_dist.training.dist" in found
    assert "genrec_dist/evaluation/evaluate.py" in found and "engine mlflow" in found
    assert "tokenization/pipeline.py" in found and "jobs.train" in found
    assert "genrec_dist/data/dataset.py" in found and "genrec_dist.config" in found
    assert len(violations(root)) == 5


def test_type_checking_imports_do_not_count_but_others_do(tmp_path):
    root = _tree_copy(tmp_path)
    _plant(root, "genrec_dist/models/tiger.py",
           "\nif TYPE_CHECKING:\n    from genrec_dist.runs.rundir import RunConfigError\n")
    assert violations(root) == []
    _plant(root, "genrec_dist/models/tiger.py",
           "\nif not TYPE_CHECKING:\n    from genrec_dist.runs.rundir import RunConfigError\n")
    assert len(violations(root)) == 1


def test_an_import_circle_fails_even_deferred(tmp_path):
    """Two modules of one group that import each other, one of them inside a function (the import runs when the
    function does), is a circle; so is a longer loop across three modules."""
    root = _tree_copy(tmp_path)
    _plant(root, "genrec_dist/tracking/base.py", "\ndef _late():\n    from genrec_dist.tracking import outbox\n")
    found = violations(root)
    assert found == ["import circle: genrec_dist.tracking.base -> genrec_dist.tracking.outbox -> "
                     "genrec_dist.tracking.base"], found
    root = _tree_copy(tmp_path / "b")
    _plant(root, "genrec_dist/models/blocks.py", "\ndef _late():\n    from genrec_dist.models import car\n")
    found = violations(root)
    assert len(found) == 1 and found[0].startswith("import circle: genrec_dist.models.blocks -> "), found


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
    assert "genrec_dist.models.car" in core and "genrec_dist.evaluation.evaluate" in core
