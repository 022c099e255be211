"""Item tokenization: text embedding and residual k-means on Ray, producing semantic IDs.

Layers (imports point down):
- pure core: ``kmeans`` (numpy reference + torch path over row shards), ``balanced`` (capacity-constrained levels)
  and ``collision_free`` (the last level matched inside shared-prefix groups), both driving the same shards,
  ``embed`` (the embedding UDF class),
  ``embedding_store`` (Parquet shards); the settings are ``genrec_dist.tokenize_config``;
- Ray: ``ray_embed`` (Ray Data ``map_batches``), ``ray_kmeans`` (one actor per shard); starting Ray is
  ``genrec_dist.ray_runtime``, shared with Ray Train;
- the stage: ``pipeline.run_tokenize(cfg)`` (MLflow through ``genrec_dist.tracking``), run by ``jobs/tokenize.py``.
"""
