"""LSH and exact top-K on Spark against numpy ground truth, determinism and edge cases."""

from __future__ import annotations

import numpy as np
import pytest
from pyspark.sql.types import ArrayType, FloatType, StringType, StructField, StructType

from recsys.knn import LSHParams, exact_top_k, recall_at_k, top_k
from tests.unit.test_knn_kernels import clustered

pytestmark = pytest.mark.spark

SCHEMA = StructType([StructField("article_id", StringType()), StructField("vector", ArrayType(FloatType()))])


def frame(spark, vectors: np.ndarray, ids: list[str] | None = None):  # type: ignore[no-untyped-def]
    ids = ids or [f"a{i:05d}" for i in range(len(vectors))]
    return spark.createDataFrame([(i, v.tolist()) for i, v in zip(ids, vectors)], SCHEMA)


def lists(df) -> dict[str, list[tuple[int, str, float]]]:  # type: ignore[no-untyped-def]
    out: dict[str, list[tuple[int, str, float]]] = {}
    for r in df.collect():
        out.setdefault(r["article_id"], []).append((r["rank"], r["neighbour_id"], r["score"]))
    return {k: sorted(v) for k, v in out.items()}


def test_exact_backend_equals_numpy_brute_force(spark) -> None:  # type: ignore[no-untyped-def]
    v = clustered(400, 16, 6, seed=2)
    v[5] = v[6]  # a tie
    result = lists(top_k(frame(spark, v), 5, backend="exact", block_size=128))
    neighbours, scores = exact_top_k(v, np.arange(400), 5)
    for i in range(400):
        got = result[f"a{i:05d}"]
        assert [r for r, _, _ in got] == [1, 2, 3, 4, 5]
        assert [n for _, n, _ in got] == [f"a{j:05d}" for j in neighbours[i]]
        assert np.allclose([s for _, _, s in got], scores[i], atol=1e-5)


def test_lsh_recall_against_exact_and_contract(spark) -> None:  # type: ignore[no-untyped-def]
    v = clustered(3000, 32, 30, seed=4, spread=0.4)
    df = frame(spark, v)
    result = top_k(df, 10, params=LSHParams(bands=16, target_bucket_size=128, seed=3))
    found = lists(result)
    truth, truth_scores = exact_top_k(v, np.arange(3000), 10)
    hits = 0
    for i in range(3000):
        got = found.get(f"a{i:05d}", [])
        scores = [s for _, _, s in got]
        assert all(a >= b for a, b in zip(scores, scores[1:]))  # score descending
        assert [r for r, _, _ in got] == list(range(1, len(got) + 1))  # ranks without gaps
        assert f"a{i:05d}" not in [n for _, n, _ in got]  # never itself
        hits += sum(s >= truth_scores[i, -1] - 1e-6 for s in scores)
    recall = hits / 30000
    assert recall >= 0.9, recall
    measured = recall_at_k(df, result, 10, sample=300)
    assert measured["queries"] == 300
    assert abs(measured["recall"] - recall) < 0.05


def test_recall_measure_can_fail(spark) -> None:  # type: ignore[no-untyped-def]
    """A deliberately weak LSH (1 band, many bits) measures far lower recall."""
    v = clustered(2000, 32, 20, seed=8, spread=0.4)
    df = frame(spark, v)
    weak = top_k(df, 10, params=LSHParams(bands=1, bits_per_band=12, seed=3))
    assert recall_at_k(df, weak, 10, sample=200)["recall"] < 0.6


def test_results_are_deterministic_for_a_seed(spark) -> None:  # type: ignore[no-untyped-def]
    v = clustered(800, 16, 10, seed=6)
    df = frame(spark, v)
    params = LSHParams(bands=6, target_bucket_size=64, seed=11)
    assert lists(top_k(df, 5, params=params)) == lists(top_k(df, 5, params=params))


def test_skewed_bucket_is_windowed_not_all_pairs(spark) -> None:  # type: ignore[no-untyped-def]
    """30% of the items are near-copies of one vector: their bucket exceeds max_bucket_size."""
    rng = np.random.default_rng(0)
    v = clustered(1000, 16, 10, seed=9)
    v[:300] = v[0] + 1e-3 * rng.standard_normal((300, 16)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    result = lists(top_k(frame(spark, v), 5, params=LSHParams(bands=4, target_bucket_size=64, max_bucket_size=100)))
    assert all(len(result[f"a{i:05d}"]) == 5 for i in range(300))


def test_edge_cases(spark) -> None:  # type: ignore[no-untyped-def]
    empty = spark.createDataFrame([], SCHEMA)
    assert top_k(empty, 5).count() == 0
    one = frame(spark, clustered(1, 4, 1))
    assert top_k(one, 5).count() == 0
    three = frame(spark, clustered(3, 4, 2))
    few = lists(top_k(three, 10))
    assert all(len(rows) == 2 for rows in few.values())  # k > catalogue: all it can, no padding
    with pytest.raises(ValueError, match="k must be >= 1"):
        top_k(three, 0)
    bad = clustered(4, 4, 2)
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"1 vector\(s\) hold NaN or inf, e.g. article_id a00002"):
        top_k(frame(spark, bad), 2)
    zero = clustered(4, 4, 2)
    zero[3] = 0
    with pytest.raises(ValueError, match=r"1 zero vector\(s\) have no direction, e.g. article_id a00003"):
        top_k(frame(spark, zero), 2)
    mixed = spark.createDataFrame([("a", [1.0, 0.0]), ("b", [1.0, 0.0, 0.0])], SCHEMA)
    with pytest.raises(ValueError, match="different lengths"):
        top_k(mixed, 1)
