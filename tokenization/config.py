"""Compatibility name: the ``tokenize:`` section lives in :mod:`genrec_dist.tokenize_config`, where the core config
can read it without importing this package (``tokenization`` depends on ``genrec_dist``, never the reverse)."""

from genrec_dist.tokenize_config import TokenizeConfig, UngerStage1Config

__all__ = ["TokenizeConfig", "UngerStage1Config"]
