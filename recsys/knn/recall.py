"""recall@K of a top-K table against exact search on a sample of queries."""

from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from recsys.knn.exact import exact_pairs
from recsys.knn.scoring import prepare
from recsys.tables import first_row


def recall_at_k(
    vectors: DataFrame, result: DataFrame, k: int, sample: int, seed: int = 7
) -> dict[str, float]:
    """recall@k of ``result`` against exact KNN on a sample of query articles.

    A returned neighbour is a hit when its exact score reaches the exact k-th score (minus
    1e-6), so a tie with the k-th neighbour counts; recall = hits / min(k, n - 1), averaged
    over the sampled queries (chosen by a hash of article_id and ``seed``; exact search runs
    distributed, see :func:`exact_pairs`).

    Returns:
        ``{"recall": r, "queries": q}``.
    """
    indexed, n, dim = prepare(vectors)
    queries = indexed.orderBy(F.xxhash64("article_id", F.lit(seed)), "article_id").limit(sample).persist()
    try:
        n_q = queries.count()
        if n_q == 0 or n < 2:
            return {"recall": float("nan"), "queries": float(n_q)}
        truth = exact_pairs(indexed, queries, k, dim, 2048, 25_000)
        names = indexed.select("idx", "article_id")
        kth = truth.groupBy("idx").agg(F.min("score").alias("kth"), F.count(F.lit(1)).alias("possible"))
        query_names = names.join(kth, "idx")
        found = result.join(query_names, "article_id").where(F.col("score") >= F.col("kth") - 1e-6)
        hits = found.groupBy("article_id").agg(F.count(F.lit(1)).alias("hits"))
        per_query = query_names.join(hits, "article_id", "left").select(
            (F.coalesce("hits", F.lit(0)) / F.col("possible")).alias("recall")
        )
        value = first_row(per_query.agg(F.avg("recall")))[0]
        return {"recall": float(value), "queries": float(n_q)}
    finally:
        queries.unpersist()
        indexed.unpersist()
