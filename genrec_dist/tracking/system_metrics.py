"""MLflow's system metrics (CPU, memory, disk, network, GPU) logged through a tracker."""

from __future__ import annotations

import logging
import threading
from typing import Any

_log = logging.getLogger("genrec_dist.tracking")


class SystemMetrics:
    """MLflow's system metrics through the tracker: MLflow's own monitors (``SystemMetricsMonitor``: CPU and memory
    via psutil, disk, network, NVIDIA GPUs via ``nvidia-ml-py``) sampled every ``interval_s`` on a thread, each sample
    logged as ``system/<name>`` at steps 0, 1, 2, ... (MLflow's names and steps, so the run page's System metrics
    charts show them). Through the tracker's ``log``, not MLflow's own logging thread: an unreachable server
    spools them like every other metric and never blocks ``close()``. A last sample is taken when it stops, so
    even a run shorter than ``interval_s`` has one."""

    def __init__(self, tracker: Any, interval_s: float):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.tracker, self.interval_s = tracker, interval_s
        # Its monitors only (no request is made: its own loop, which polls the run over HTTP, never starts).
        self.monitors = SystemMetricsMonitor(tracker.run_id, sampling_interval=interval_s,
                                             tracking_uri=tracker.uri).monitors
        self.step = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"system-metrics-{tracker.run_id[:8]}", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        values: dict[str, float] = {}
        for monitor in self.monitors:
            monitor.collect_metrics()
            values.update(monitor.aggregate_metrics())
            monitor.clear_metrics()
        self.tracker.log({f"system/{k}": v for k, v in values.items()}, self.step)
        self.step += 1

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.interval_s):
                self._sample()
        except Exception:  # noqa: BLE001 - a monitor that fails (a GPU gone) ends the sampling, never the job
            _log.warning("system metrics of run %s stopped", self.tracker.run_id, exc_info=True)

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=10)
        try:
            self._sample()
        except Exception:  # noqa: BLE001
            _log.debug("last system metrics sample failed", exc_info=True)
