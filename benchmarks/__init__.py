"""Speed and ablation measurements: scripts that print a table and write JSON to ``benchmarks/results/``. Each runs
from the repository root as a module (``python -m benchmarks.leaderboard ...``), so the repository is on the path and
no benchmark's name (``tokenize``) shadows a standard-library module."""
