"""Imported first by every job, the one place that fixes the import path of ``python jobs/<job>.py``.

Python puts the script's folder (``jobs/``) first on ``sys.path``, where ``jobs/tokenize.py`` would shadow the
standard library's ``tokenize`` (read by ``linecache``, ``inspect`` and tracebacks) in every job: the folder comes
off the path, so ``genrec_dist`` and the standard library resolve as in any other process.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
