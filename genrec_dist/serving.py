"""A trained run as an MLflow model: a ``pyfunc`` that takes histories and returns the top-k items and their scores.

The MLflow model wraps the run's export (``model.pt`` + ``model.json`` + ``semantic_ids/``, :mod:`export`) as one
artifact, so it needs nothing else to load; the ``genrec_dist`` sources travel with it (``code_paths``), so
``mlflow models serve`` runs it in any environment that has torch and mlflow::

    request   {"dataframe_records": [{"user": "A1", "history": [12, 7, 93]}, ...], "params": {"k": 10}}
    response  {"predictions": [{"user": "A1", "items": [...], "scores": [...]}, ...]}   best first

``history`` holds item ids (1..num_items), oldest first; ``user`` is optional and returned as given ("" for a row
without one when others have one). Params:
``k`` (default 10), and the model's own inference settings with their trained values as defaults (CAR:
``inference`` fast/slow; beam-search models: ``beam_width``). A request that is not a list of item ids, names an
item the catalog does not have, or asks for an unknown inference mode is answered 400 with a one-line message
(the scoring server maps :class:`MlflowException` ``INVALID_PARAMETER_VALUE`` to 400). The checks and the ranking
are :mod:`genrec_dist.serve_request`'s, shared with the Ray Serve application (``jobs/serve.py``), so both servers
answer a request the same way.

Training logs it at the end of a run (:func:`save_model`, then the tracker's ``log_model``) and registers it as
:func:`registered_name` (``genrec-<dataset>-<model>``). This module is the only one besides the tracker that imports
mlflow (the core never does; training imports this module only when it logs to MLflow).
"""

from __future__ import annotations

import os
import re
from importlib import metadata
from typing import Any

import mlflow.pyfunc
import torch

from genrec_dist import serve_request as R
from genrec_dist.runs.export import load_exported
from genrec_dist.serve_request import DEFAULT_K

_ARTIFACT = "model"  # the export's folder inside the MLflow model (artifacts/model/)


def registered_name(dataset: str, model: str) -> str:
    """Model Registry name of a dataset's model: ``genrec-<dataset>-<model>`` (lower case, [a-z0-9-] only)."""
    return re.sub(r"[^a-z0-9-]+", "-", f"genrec-{dataset}-{model}".lower()).strip("-")


def _invalid(message: str) -> Exception:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def histories_tensor(histories: list[Any], num_items: int, max_history: int) -> torch.Tensor:
    """(B, max_history) item ids, left-padded with 0, each history cut to its last ``max_history`` items. Raises the
    400 error for anything that is not a non-empty list of known item ids, naming the row."""
    try:
        return R.left_pad([R.check_history(h, i, num_items) for i, h in enumerate(histories)], max_history)
    except R.RequestError as exc:
        raise _invalid(str(exc)) from None


class GenRecModel(mlflow.pyfunc.PythonModel):
    """The pyfunc: loads the export once, ranks a DataFrame of histories (module docstring)."""

    # (no type hints on these two: MLflow would read predict's as an input schema)
    def load_context(self, context):
        path = context.artifacts[_ARTIFACT]  # .../artifacts/model: the export, as load_exported reads it
        self.model, self.meta = load_exported(os.path.dirname(os.path.normpath(path)))
        self.num_items = int(self.meta["num_items"])
        self.max_history = int(getattr(self.model.cfg, "max_history", 50))
        self.defaults = {"k": DEFAULT_K, **R.inference_params(self.model)}

    def predict(self, context, model_input, params=None):
        import pandas as pd

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "history" not in frame.columns:
            raise _invalid(f"the input needs a 'history' column (a list of item ids per row), got columns "
                           f"{list(frame.columns)}")
        try:  # (the scoring server has already dropped params the signature does not name)
            k, p = R.check_params(params, self.defaults, self.model, self.num_items, strict=False)
        except R.RequestError as exc:
            raise _invalid(str(exc)) from None
        history = histories_tensor(list(frame["history"]), self.num_items, self.max_history)
        ranked = R.rank(self.model, history, k, p)
        out = pd.DataFrame({"items": [i for i, _ in ranked], "scores": [s for _, s in ranked]})
        if "user" in frame.columns:
            # a row without one gets "" (a None would go out as NaN, which is not JSON)
            out.insert(0, "user", ["" if u is None or u != u else str(u) for u in frame["user"]])
        return out


def signature(params: dict[str, Any]) -> Any:
    """Input: ``user`` (optional string), ``history`` (list of item ids); output: ``user``, ``items``, ``scores``;
    params: ``k`` and the model's inference settings with their defaults."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    inputs = Schema([ColSpec(DataType.string, "user", required=False), ColSpec(Array(DataType.long), "history")])
    outputs = Schema([ColSpec(DataType.string, "user", required=False), ColSpec(Array(DataType.long), "items"),
                      ColSpec(Array(DataType.double), "scores")])
    types = {int: DataType.long, str: DataType.string}
    specs = [ParamSpec("k", DataType.long, DEFAULT_K)]
    specs += [ParamSpec(name, types[type(value)], value) for name, value in params.items()]
    return ModelSignature(inputs=inputs, outputs=outputs, params=ParamSchema(specs))


def _requirements() -> list[str]:
    """Pinned to this environment (no slow inference of what the model imports)."""
    out = []
    for dist in ("mlflow", "cloudpickle", "torch", "numpy", "pandas", "polars", "pyarrow", "pyyaml", "fsspec"):
        try:
            out.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    return out


def _code_paths() -> list[str]:
    """The package a loaded model imports: ``genrec_dist`` (which never imports ``tokenization``)."""
    return [os.path.dirname(os.path.abspath(__file__))]


def save_model(export_dir: str, path: str, example_histories: list[list[int]],
               model: torch.nn.Module | None = None) -> str:
    """Save the export at ``export_dir`` (a run's local ``model/``) as an MLflow pyfunc model folder ``path`` with a
    signature and an input example (``example_histories``: a few real histories). ``model``: that export already
    loaded (the end of training has it), so it is not loaded a second time (at a million items each copy of the
    item table is hundreds of MB). Returns ``path``."""
    import pandas as pd

    if os.path.basename(os.path.normpath(export_dir)) != _ARTIFACT:
        raise ValueError(f"{export_dir}: expected a run's exported '{_ARTIFACT}' folder")
    if model is None:
        model, _ = load_exported(os.path.dirname(os.path.normpath(export_dir)))
    example = pd.DataFrame({"user": [f"example-{i}" for i in range(len(example_histories))],
                            "history": [list(map(int, h)) for h in example_histories]})
    mlflow.pyfunc.save_model(path, python_model=GenRecModel(), artifacts={_ARTIFACT: export_dir},
                             signature=signature(R.inference_params(model)), input_example=example,
                             code_paths=_code_paths(), pip_requirements=_requirements())
    return path
