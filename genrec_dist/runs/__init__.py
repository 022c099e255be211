"""A run: everything a training run leaves behind, and everything that finds, reads and checks it.

A run lives in ``<runs dir>/<run name>/`` (local or ``s3://``)::

    run.json        run name, model, MLflow run id, creation time, the dataset's absolute location, and what it
                    trains on by content (``inputs``), written when the run starts           (rundir.py)
    config.yaml     the whole config the run started with, its locations absolute             (rundir.py)
    checkpoints/    resume state: DeepSpeed's files, RNG states, data cursor; "latest" once complete
                    (unless train.checkpoint_dir points elsewhere)                             (checkpoint.py)
    model/          the exported best-on-validation model and its inference settings          (export.py)
    metrics.json    test metrics of the model and of the most-popular baseline (written at the end)
    history.json    the logged training and validation metrics
    eval-*.json     what the evaluate job wrote

``find.py`` is the one resolver of a job's ``--run`` (a run dir, a run name or an MLflow run id). This package sits
below training, evaluation, recommend and serving: each of them imports it, never the reverse.
"""
