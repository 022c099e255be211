"""A crash-safe, append-only queue on local disk: tracking items that have not reached the server yet.

One JSON object per line, each appended and flushed as it happens, so a killed process keeps everything it wrote::

    {"spool": 1, "uri": "http://host:5000", "run_id": "..."}   header, once, when the file is created
    {"seq": 7, "op": "metrics", ...}                          an item, in logging order
    {"ack": [7, 8]}                                           those items reached the server (or were set aside)

Pending = items with no ack, in ``seq`` order. The file is removed once nothing is pending. An artifact item's
files live in ``<spool without .jsonl>.files/`` beside it (``item["files"]`` is relative to the spool's folder).
A line cut short by a crash is skipped on reading. Plain JSON and files: no MLflow here (:mod:`genrec_dist.tracking`
delivers the items).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Iterable

SUFFIX = ".jsonl"


def files_dir(path: str) -> str:
    """Where artifact items of the spool ``path`` keep their files."""
    return (path[: -len(SUFFIX)] if path.endswith(SUFFIX) else path) + ".files"


def read(path: str) -> tuple[dict[str, Any], dict[int, dict[str, Any]], int]:
    """(header, pending items by seq in order, highest seq ever written) of the spool at ``path``."""
    header: dict[str, Any] = {}
    items: dict[int, dict[str, Any]] = {}
    last = -1
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # the last line of a process killed mid-write
                continue
            if "spool" in rec:
                header = rec
            elif "ack" in rec:
                for seq in rec["ack"]:
                    items.pop(int(seq), None)
            elif "seq" in rec:
                items[int(rec["seq"])] = rec
                last = max(last, int(rec["seq"]))
    return header, dict(sorted(items.items())), last


class Spool:
    """The spool at ``path`` (an existing one is continued: its pending items come first). One writer at a time."""

    def __init__(self, path: str, header: dict[str, Any]):
        self.path = path
        self.header = {"spool": 1, **header}
        self._items: dict[int, dict[str, Any]] = {}
        self._next = 0
        self._cut = False  # the file ends in a line cut short by a crash: it must not swallow the next one
        if os.path.exists(path):
            _, self._items, last = read(path)
            self._next = last + 1
            with open(path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                if fh.tell():
                    fh.seek(-1, os.SEEK_END)
                    self._cut = fh.read(1) != b"\n"
            if not self._items:  # every item was done when the last writer stopped
                remove(path)

    def __len__(self) -> int:
        return len(self._items)

    def pending(self) -> list[dict[str, Any]]:
        return list(self._items.values())

    def append(self, items: Iterable[dict[str, Any]]) -> None:
        lines = []
        for item in items:
            item = {**item, "seq": self._next}
            self._next += 1
            self._items[item["seq"]] = item
            lines.append(item)
        if lines:
            self._write(lines)

    def ack(self, seqs: Iterable[int]) -> None:
        """Mark items done; once none is pending the spool (and its files folder, if empty) is removed."""
        seqs = [int(s) for s in seqs if int(s) in self._items]
        if not seqs:
            return
        for s in seqs:
            del self._items[s]
        if self._items:
            self._write([{"ack": seqs}])
        else:
            remove(self.path)

    def _write(self, records: list[dict[str, Any]]) -> None:
        new = not os.path.exists(self.path)
        if new:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        lines = ([self.header] if new else []) + records
        with open(self.path, "a", encoding="utf-8") as fh:
            text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in lines)
            fh.write("\n" + text if self._cut and not new else text)
            fh.flush()
        self._cut = False


def remove(path: str) -> None:
    """Remove a spool whose items are all done (its files folder too, if nothing is left in it)."""
    if os.path.exists(path):
        os.remove(path)
    folder = files_dir(path)
    if os.path.isdir(folder) and not any(os.scandir(folder)):
        shutil.rmtree(folder, ignore_errors=True)
