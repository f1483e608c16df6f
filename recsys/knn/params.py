"""LSH parameters and a fitted index: plain dataclasses, no Spark (the algorithm is in :mod:`recsys.knn`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

Segments = tuple[tuple[str, int, int], ...]
"""``(name, start, end)`` slices of a vector whose cosines are reported separately (the modalities of a fused vector)."""


@dataclass(frozen=True)
class LSHParams:
    """LSH parameters (``knn.lsh``; the module docstring gives the algorithm).

    Attributes:
        hash: ``kmeans`` (k-means buckets, multi-probe) or ``srp`` (random hyperplane signs).
        bands: independent hash functions; a pair is a candidate when any band brings it together.
        probes: ``kmeans``: buckets a query is scored against per band (its nearest centroids).
        target_bucket_size: mean articles per bucket; sets the buckets per band
            (``kmeans``: ``n / target`` centroids; ``srp`` with ``bits_per_band`` 0:
            ``ceil(log2(n / target))`` bits).
        bits_per_band: ``srp``: hyperplanes per band (0: from ``target_bucket_size``).
        max_bucket_size: larger buckets are scored in windows of this many members.
        sample_size: ``kmeans``: vectors the centroids are trained on (a deterministic sample).
        iterations: ``kmeans``: Lloyd iterations.
        seed: seed of the sample, the centroids, the hyperplanes and the window projection.
    """

    hash: str = "kmeans"
    bands: int = 1
    probes: int = 20
    target_bucket_size: int = 60
    bits_per_band: int = 0
    max_bucket_size: int = 4000
    sample_size: int = 25_000
    iterations: int = 8
    seed: int = 42

    def resolved(self, n: int) -> LSHParams:
        """With ``srp`` and ``bits_per_band == 0``, pick ``ceil(log2(n / target_bucket_size))``
        bits (at least 0: a catalogue smaller than the target is one bucket, i.e. exact)."""
        if self.hash != "srp" or self.bits_per_band > 0:
            return self
        bits = max(0, math.ceil(math.log2(max(1, n) / self.target_bucket_size)))
        return replace(self, bits_per_band=bits)

    def buckets(self, n: int) -> int:
        """Buckets per band for ``n`` articles."""
        if self.hash == "srp":
            return 1 << self.resolved(n).bits_per_band
        # k-means needs about ten sample vectors per centroid
        return int(max(1, min(round(n / self.target_bucket_size), self.sample_size // 10, n)))


@dataclass(frozen=True)
class LSHIndex:
    """Fitted LSH hash functions (:func:`fit_index`): k-means centroids or hyperplanes, and the
    grouping of buckets. Reusing one index keeps neighbour lists comparable between runs and
    makes :func:`update_top_k` equal to a full recompute.

    ``largest_bucket``: members of the largest home bucket (over all bands) among the vectors
    the index was fitted on, None when not known (an index saved before it was recorded). It
    bounds the largest bucket after later changes (each new or changed vector joins one bucket
    per band), so :func:`update_top_k` can skip measuring the buckets."""

    params: LSHParams
    dim: int
    fitted: dict[str, Any]
    largest_bucket: int | None = None
