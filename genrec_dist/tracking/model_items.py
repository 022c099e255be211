"""The two delivery items beyond metrics, params, tags and files: a saved MLflow model (logged as a LoggedModel of the
run, then registered) and an MLflow dataset input. The outbox's sender calls them (``sender``: its client, run id
and server address), so both are spooled and replayed like every other item."""

from __future__ import annotations

import json
import logging
import os
import warnings
from typing import Any

from genrec_dist.tracking.failures import rejected, short

_log = logging.getLogger("genrec_dist.tracking")


LOGGED_MODEL_NAME = "recommender"


def log_saved_model(sender: Any, path: str, registered_name: str | None, step: int) -> None:
    """What ``mlflow.pyfunc.log_model`` does with a model saved beforehand: a LoggedModel of the run (its ``MLmodel``
    rewritten to name it), its files, READY; then a registry version whose source is that model."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    client, run_id = sender.client, sender.run_id
    mlmodel = Model.load(path)
    # Not "model": MLflow's list_artifacts(run, "model/...") also lists the files of the run's logged model of that
    # name, looked up in the process's default store (not the client's), so the export's own "model/" folder would
    # clash with it ("Logged model ... not found").
    logged = client.create_logged_model(client.get_run(run_id).info.experiment_id, name=LOGGED_MODEL_NAME,
                                        source_run_id=run_id, tags={"mlflow.modelFlavor": ",".join(mlmodel.flavors)})
    mlmodel.run_id, mlmodel.model_id, mlmodel.model_uuid = run_id, logged.model_id, logged.model_id
    mlmodel.artifact_path = logged.artifact_location
    os.remove(os.path.join(path, "MLmodel"))  # a link to the caller's file: write a new one, not through it
    mlmodel.save(os.path.join(path, "MLmodel"))
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=step)])
    client.log_model_artifacts(logged.model_id, path)
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    if registered_name:
        _register(sender, registered_name, logged.model_id, logged.artifact_location)


def _register(sender: Any, name: str, model_id: str, location: str) -> None:
    from mlflow.exceptions import MlflowException

    client, run_id = sender.client, sender.run_id
    try:
        try:
            client.create_registered_model(name)
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
        # source: the model's artifact location itself (a "models:/<id>" source is resolved against the process's
        # default tracking URI, not this client's)
        version = client.create_model_version(name, location, run_id=run_id, model_id=model_id,
                                              await_creation_for=0)
    except MlflowException as exc:
        if not rejected(exc):
            raise
        _log.warning("MLflow %s did not register the model of run %s as %r (%s): the model stays logged on the run; "
                     "a store without a Model Registry cannot register it", sender.uri, run_id, name, short(exc))
        return
    client.set_tag(run_id, "genrec.registered_model", f"{name}/{version.version}")
    _log.info("model of run %s registered as models:/%s/%s", run_id, name, version.version)


def dataset_input(item: dict[str, Any]) -> Any:
    """An ``input`` spool item as MLflow's DatasetInput: a MetaDataset (metadata only, nothing uploaded) whose source
    MLflow resolves from the path (local, s3://, ...)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    def col_type(t: str) -> Any:
        return Array(DataType[t[6:-1]]) if t.startswith("array<") else DataType[t]

    schema = Schema([ColSpec(col_type(t), n) for n, t in item["schema"].items()]) if item["schema"] else None
    with warnings.catch_warnings():  # a relative path "can be interpreted in multiple ways" (all of them local)
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(item["source"])
    d = MetaDataset(source, name=item["name"], digest=item["digest"], schema=schema).to_dict()
    entity = Dataset(d["name"], d["digest"], d["source_type"], d["source"], d.get("schema"),
                     json.dumps(item["profile"]) if item["profile"] else None)
    return DatasetInput(entity, tags=[InputTag(MLFLOW_DATASET_CONTEXT, item["context"])])
