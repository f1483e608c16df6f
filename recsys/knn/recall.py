"""recall@K of a top-K table against exact search on a sample of queries."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from recsys.knn.arrow import task_threads, vectors_of
from recsys.knn.scoring import prepare


def recall_at_k(
    vectors: DataFrame, result: DataFrame, k: int, sample: int, seed: int = 7
) -> dict[str, float]:
    """recall@k of ``result`` against exact KNN on a sample of query articles.

    A returned neighbour is a hit when its exact score reaches the exact k-th score (minus
    1e-6), so a tie with the k-th neighbour counts; recall = hits / min(k, n - 1), averaged
    over the sampled queries (chosen by a hash of article_id and ``seed``).

    The exact k-th scores come from one distributed pass: the sampled query vectors
    (``sample × d`` float32, a few MB) travel with the task, each task scores them against its
    partition of the catalogue and returns its best ``k`` per query; the driver merges those
    (``sample × k × tasks`` scores) and the sampled rows of ``result``.

    Args:
        vectors: ``(article_id, vector)`` as for :func:`recsys.knn.top_k`.
        result: a top-K table (``article_id, neighbour_id, score``) of those vectors.
        k: the K of recall@K; sample: query articles, seed: their hash seed.

    Returns:
        ``{"recall": r, "queries": q}`` (``r`` NaN without queries or with one article).

    Raises:
        ValueError: invalid vectors (see :func:`recsys.knn.scoring.prepare`).
    """
    indexed, n, dim = prepare(vectors)
    try:
        chosen = (indexed.orderBy(F.xxhash64("article_id", F.lit(seed)), "article_id").limit(sample)
                  .select("idx", "article_id", "vec").toArrow())
        n_q = chosen.num_rows
        if n_q == 0 or n < 2:
            return {"recall": float("nan"), "queries": float(n_q)}
        q_vec = vectors_of(chosen.column("vec").combine_chunks(), dim)
        q_idx = chosen.column("idx").to_numpy()
        want = min(k, n - 1)

        def best(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
            import torch

            task_threads()
            queries = torch.from_numpy(q_vec)
            for batch in batches:
                if batch.num_rows == 0:
                    continue
                data = vectors_of(batch.column("vec"), dim)
                s = queries @ torch.from_numpy(data).T  # (queries, rows)
                s[torch.from_numpy(q_idx[:, None] == batch.column("idx").to_numpy()[None, :])] = -float("inf")
                top = torch.topk(s, min(want, s.shape[1]), dim=1).values.numpy()
                yield pa.RecordBatch.from_arrays(
                    [pa.array(np.repeat(np.arange(n_q, dtype=np.int32), top.shape[1])), pa.array(top.ravel())],
                    names=["q", "score"])

        found = indexed.select("idx", "vec").mapInArrow(best, "q int, score float").toArrow()  # type: ignore[arg-type]
        q_pos, q_score = found.column("q").to_numpy(), found.column("score").to_numpy()
        order = np.lexsort((-q_score, q_pos))
        starts = np.searchsorted(q_pos[order], np.arange(n_q))
        # each batch returns its best min(want, rows) per query (self as -inf), so a query has at least
        # want finite scores in all and its top want are among them
        kth = q_score[order][starts + want - 1]
        kth_of = dict(zip(chosen.column("article_id").to_pylist(), kth.tolist()))
        rows = (result.join(indexed.sparkSession.createDataFrame([(a,) for a in kth_of], "article_id string"),
                            "article_id", "left_semi")
                .select("article_id", "score").toArrow())
        hits = dict.fromkeys(kth_of, 0)
        for article, score in zip(rows.column("article_id").to_pylist(), rows.column("score").to_pylist()):
            if score is not None and score >= kth_of[article] - 1e-6:
                hits[article] += 1
        return {"recall": float(np.mean([h / want for h in hits.values()])), "queries": float(n_q)}
    finally:
        indexed.unpersist()
