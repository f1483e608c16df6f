"""The ``mllib`` KNN backend: Spark MLlib's ``BucketedRandomProjectionLSH``, used as a fair
user of MLlib would, as the baseline the ``lsh`` backend is measured against.

MLlib's LSH for Euclidean distance (Datar et al. 2004, "Locality-sensitive hashing scheme based
on p-stable distributions"; `MLlib guide
<https://spark.apache.org/docs/latest/ml-features.html#bucketed-random-projection-for-euclidean-distance>`_)
hashes ``floor(v · r / bucketLength)`` for ``numHashTables`` random unit vectors ``r``; a pair
is a candidate when any one table agrees (OR over tables, no AND within a table).
``approxSimilarityJoin`` returns every candidate pair closer than a distance threshold, not a
top-K, so the top-K per article is a window over those pairs afterwards. On unit vectors the
Euclidean distance is ``sqrt(2 - 2 cos)``, so the ranking equals the cosine ranking.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pyspark.ml.feature import BucketedRandomProjectionLSH
from pyspark.ml.functions import array_to_vector
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F


@dataclass(frozen=True)
class MLlibParams:
    """``BucketedRandomProjectionLSH`` settings.

    Attributes:
        bucket_length: bucket width; 0 uses the MLlib documentation's rule for normalised
            inputs, ``pow(n, -1/d)`` times ``bucket_length_factor`` (the guide says 1 to 10).
        bucket_length_factor: the factor of the rule.
        num_hash_tables: hash tables (OR-amplification: more tables, more candidates).
        threshold: largest Euclidean distance joined; 0 takes ``sqrt(2 - 2 · min_cosine)``.
        min_cosine: with ``threshold`` 0, the lowest cosine a neighbour may have.
        seed: hash seed.
    """

    bucket_length: float = 0.0
    bucket_length_factor: float = 1.0
    num_hash_tables: int = 3
    threshold: float = 0.0
    min_cosine: float = 0.5
    seed: int = 42

    def length(self, n: int, dim: int) -> float:
        """The bucket length used for ``n`` vectors of dimension ``dim``."""
        if self.bucket_length > 0:
            return self.bucket_length
        return self.bucket_length_factor * math.pow(max(n, 2), -1.0 / max(dim, 1))

    def distance(self) -> float:
        """The Euclidean distance threshold of the join."""
        return self.threshold if self.threshold > 0 else math.sqrt(max(0.0, 2.0 - 2.0 * self.min_cosine))


def mllib_pairs(indexed: DataFrame, k: int, params: MLlibParams, n: int, dim: int) -> DataFrame:
    """Top-``k`` per article from MLlib's ``approxSimilarityJoin`` of the vectors with themselves.

    Args:
        indexed: ``(idx long, vector array<float>)``, L2-normalised.
        k: neighbours per article.
        params: MLlib settings; ``n`` and ``dim`` feed the bucket-length rule.

    Returns:
        ``idx, nidx, score, rank`` (``recsys.knn.arrow.pair_schema(ranked=True)``),
        score = ``1 - distance² / 2`` (the cosine), rank by score then ``nidx``.
    """
    features = indexed.select("idx", array_to_vector(F.col("vector")).alias("features"))
    model = BucketedRandomProjectionLSH(
        inputCol="features", outputCol="hashes", bucketLength=params.length(n, dim),
        numHashTables=params.num_hash_tables, seed=params.seed,
    ).fit(features)
    joined = model.approxSimilarityJoin(features, features, params.distance(), distCol="distance")
    pairs = joined.select(
        F.col("datasetA.idx").alias("idx"),
        F.col("datasetB.idx").alias("nidx"),
        (1.0 - F.col("distance") * F.col("distance") / 2.0).cast("float").alias("score"),
    ).where(F.col("idx") != F.col("nidx"))
    window = Window.partitionBy("idx").orderBy(F.col("score").desc(), F.col("nidx"))
    return (
        pairs.withColumn("rank", F.row_number().over(window).cast("int"))
        .where(F.col("rank") <= k)
        .select("idx", "nidx", "score", "rank")
    )
