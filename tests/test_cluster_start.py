"""A newcomer's first `ray job submit`: `cluster/start_ray.sh head` on a machine with no Ray settings but the token an
earlier local `ray.init` left in ~/.ray/auth_token prints the exports a submitting shell needs, and a shell with only
those exports submits a job that succeeds (such a head turns token auth on by itself; a submit without the exports
fails with "Missing authentication token")."""

from __future__ import annotations

import os
import subprocess
import sys

from _util import REPO, free_port


def test_the_printed_exports_are_all_a_submitting_shell_needs(tmp_path):
    home, temp = tmp_path / "home", f"/tmp/rs{os.getpid()}"  # short: Ray's unix sockets live under the temp dir
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(os.urandom(32).hex())  # what a local ray.init leaves behind
    bin_dir = os.path.dirname(sys.executable)
    # a new user's environment: no RAY_* variables, a HOME without a token
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    base.update(HOME=str(home), PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))
    node = {**base, "GENREC_RAY_TEMP_DIR": temp, "GENREC_RAY_PORT": str(free_port()),
            "GENREC_RAY_DASHBOARD_PORT": str(free_port()), "GENREC_RAY_DASHBOARD_HOST": "127.0.0.1"}
    start = subprocess.run(["bash", os.path.join(REPO, "cluster", "start_ray.sh"), "head", "--num-cpus=1",
                            f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}"],
                           env=node, capture_output=True, text=True, timeout=180)
    try:
        assert start.returncode == 0, start.stderr
        exports = dict(line.split("#")[0].strip()[len("export "):].split("=", 1)
                       for line in start.stdout.splitlines() if line.strip().startswith("export "))
        assert exports.get("RAY_AUTH_MODE") == "token" and os.path.exists(exports["RAY_AUTH_TOKEN_PATH"])
        assert exports["RAY_ADDRESS"].endswith(f":{node['GENREC_RAY_DASHBOARD_PORT']}")
        job = tmp_path / "job"
        job.mkdir()
        (job / "hello.py").write_text("print('hello from the cluster')\n")
        submit = [os.path.join(bin_dir, "ray"), "job", "submit", "--working-dir", str(job), "--", "python", "hello.py"]
        bare = subprocess.run(submit, env={**base, "RAY_ADDRESS": exports["RAY_ADDRESS"]}, capture_output=True,
                              text=True, timeout=180)
        assert bare.returncode != 0 and "authentication" in (bare.stdout + bare.stderr).lower()  # what a user hit
        ok = subprocess.run(submit, env={**base, **exports}, capture_output=True, text=True, timeout=180)
        assert ok.returncode == 0 and "hello from the cluster" in ok.stdout, ok.stdout[-2000:] + ok.stderr[-2000:]
    finally:
        subprocess.run(["bash", os.path.join(REPO, "cluster", "stop_ray.sh")], env=node, timeout=120)
        subprocess.run(["rm", "-rf", temp])
