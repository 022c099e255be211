"""What the k-means driver and its shards exchange, below the algorithms that use it (``kmeans.py``, ``balanced.py``,
``collision_free.py``): the ``call`` that reaches every shard, the labels the driver decides over nearest-centroid
ones (:class:`Override`), and the error of input k-means cannot run on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from genrec_dist.errors import GenrecError

Call = Callable[..., list]  # call(method_name, *args) -> one result per shard, in shard order


class KMeansError(GenrecError, ValueError):
    """Input k-means cannot run on (K > N, NaN/inf, empty shards); the message says which."""


@dataclass
class Override:
    """Labels the driver decided, over plain nearest-centroid ones; sent to every shard with the centroids.

    ``bias`` (K,) is added to every row's squared distance to each centroid before the argmin (the prices of the
    balanced assignment, ``tokenization/balanced.py``); ``rows`` (sorted global rows) then take ``labels`` whatever
    their scores (the balanced fix-up, the collision-free matching of ``tokenization/collision_free.py``); ``moved``
    (sorted global rows) add ``shifts`` (m, D) to their residual before the level's centroid is subtracted (items the
    collision-free pass moved to another prefix: old prefix reconstruction minus the new one)."""

    bias: np.ndarray | None = None
    rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    moved: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    shifts: np.ndarray | None = None
