"""The layering rule, checked so it cannot drift: the pure core (models, beam search, metrics, evaluation, k-means,
the dataset and semantic-ID formats) imports with ``ray``, ``deepspeed`` and ``mlflow`` made unimportable, and no
core source file mentions ``torch.distributed``."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from _util import REPO

CORE_PACKAGES = ["genrec_dist.models", "genrec_dist.evaluation"]
CORE_MODULES = ["tokenization.kmeans", "genrec_dist.data.dataset", "genrec_dist.data.semantic_ids",
                "genrec_dist.reports"]
BLOCKED = ["ray", "deepspeed", "mlflow"]

PROBE = f"""
import importlib, importlib.util, pkgutil, sys
for name in {BLOCKED!r}:
    sys.modules[name] = None  # any 'import {{name}}' now raises ImportError
mods = list({CORE_MODULES!r})
for pkg in {CORE_PACKAGES!r}:
    if importlib.util.find_spec(pkg) is None:
        continue
    mods.append(pkg)
    mods += [pkg + "." + m.name for m in pkgutil.iter_modules(importlib.import_module(pkg).__path__)]
done = []
for name in mods:
    try:
        found = importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        found = False
    if found:
        importlib.import_module(name)
        done.append(name)
print("IMPORTED", " ".join(done))
"""


def test_core_imports_without_engines():
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = proc.stdout.split("IMPORTED", 1)[1].split()
    assert "genrec_dist.models.blocks" in imported and "genrec_dist.evaluation.metrics" in imported


def test_core_sources_never_mention_distributed_engines():
    pattern = re.compile(r"^\s*(import|from)\s+(torch\.distributed|deepspeed|ray|mlflow)\b", re.M)
    offenders = []
    for pkg in CORE_PACKAGES:
        folder = os.path.join(REPO, *pkg.split("."))
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            if name.endswith(".py"):
                with open(os.path.join(folder, name), encoding="utf-8") as fh:
                    if pattern.search(fh.read()):
                        offenders.append(f"{pkg}.{name}")
    assert offenders == []
