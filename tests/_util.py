"""Small helpers for tests (ports, waiting for servers)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server for {url} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answered
        except Exception as exc:  # noqa: BLE001
            last = exc
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer in {timeout}s: {last}")


def run_job(job: str, *args: str, env: dict | None = None, timeout: float = 900, check: bool = True,
            cwd: str = REPO) -> subprocess.CompletedProcess:
    """Run ``jobs/<job>.py`` as a subprocess, the way a user does."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "jobs", f"{job}.py"), *args], cwd=cwd,
                          env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"jobs/{job}.py failed ({proc.returncode}):\nSTDOUT:\n{proc.stdout[-4000:]}\n"
                             f"STDERR:\n{proc.stderr[-6000:]}")
    return proc
