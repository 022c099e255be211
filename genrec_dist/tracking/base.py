"""The tracker protocol every job and loop logs through, the tracker of untracked runs and ranks, and the error a
tracking server that cannot be reached ends a job with."""

from __future__ import annotations

from typing import Any, Protocol

from genrec_dist.errors import GenrecError


class TrackingError(GenrecError, RuntimeError):
    """The tracking server could not be reached when the run had to start, or a replay could not finish."""


class Tracker(Protocol):
    run_id: str | None

    def log(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_config(self, cfg: Any) -> None: ...
    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_input(self, name: str, source: str, digest: str, context: str, schema: dict[str, str] | None = None,
                  profile: dict[str, Any] | None = None) -> None: ...
    def log_model(self, model_dir: str, registered_name: str | None = None, step: int = 0) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """Tracking off, or a rank other than 0."""

    run_id: str | None = None

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_config(self, cfg: Any) -> None:
        pass

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_input(self, name: str, source: str, digest: str, context: str, schema: dict[str, str] | None = None,
                  profile: dict[str, Any] | None = None) -> None:
        pass

    def log_model(self, model_dir: str, registered_name: str | None = None, step: int = 0) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass
