"""LSH and exact top-K on Spark against numpy ground truth, determinism and edge cases."""

from __future__ import annotations

import numpy as np
import pytest
from pyspark.sql.types import ArrayType, FloatType, StringType, StructField, StructType

from recsys.knn import LSHParams, MLlibParams, exact_top_k, fit_index, recall_at_k, top_k, update_top_k
from recsys.knn.index import encode_index, load_index, probed_cells, save_index
from recsys.tables import ensure_tables
from tests.conftest import cache_is_empty
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
    result = top_k(df, 10, params=LSHParams(target_bucket_size=60, probes=10, seed=3))
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
    """A deliberately weak LSH (one probe into buckets of about 25: big enough to skip the exact
    top-up, too few to hold most neighbours) measures far lower recall."""
    v = clustered(2000, 32, 20, seed=8, spread=0.4)
    df = frame(spark, v)
    weak = top_k(df, 10, params=LSHParams(probes=1, target_bucket_size=25, seed=3))
    assert recall_at_k(df, weak, 10, sample=200)["recall"] < 0.6


def test_results_are_deterministic_for_a_seed(spark) -> None:  # type: ignore[no-untyped-def]
    v = clustered(800, 16, 10, seed=6)
    df = frame(spark, v)
    params = LSHParams(bands=2, probes=4, target_bucket_size=40, seed=11)
    first = lists(top_k(df, 5, params=params))
    assert first == lists(top_k(df, 5, params=params))
    assert first != lists(top_k(df, 5, params=LSHParams(bands=2, probes=4, target_bucket_size=40, seed=12)))
    srp = LSHParams(hash="srp", bands=4, target_bucket_size=64, seed=11)
    assert lists(top_k(df, 5, params=srp)) == lists(top_k(df, 5, params=srp))


def test_skewed_bucket_is_windowed_not_all_pairs(spark) -> None:  # type: ignore[no-untyped-def]
    """30% of the items are one identical vector: k-means cannot split them, so their bucket
    exceeds max_bucket_size and is scored in windows; everyone still gets k neighbours."""
    v = clustered(1000, 16, 10, seed=9)
    v[:300] = v[0]
    result = lists(top_k(frame(spark, v), 5, params=LSHParams(target_bucket_size=50, max_bucket_size=100, probes=3)))
    assert all(len(result[f"a{i:05d}"]) == 5 for i in range(1000))
    for i in range(300):  # a copy's neighbours are copies (score 1), the smallest ids first among ties
        assert all(abs(s - 1.0) < 1e-5 for _, _, s in result[f"a{i:05d}"])
    # the windowed copies still find their top-5 among the other copies only
    assert {n for _, n, _ in result["a00000"]} <= {f"a{i:05d}" for i in range(300)}


def test_backends_share_one_contract(spark) -> None:  # type: ignore[no-untyped-def]
    """mllib and srp return the same table shape and order; on a tiny catalogue all equal exact."""
    v = clustered(60, 8, 3, seed=12)
    df = frame(spark, v)
    exact = top_k(df, 4, backend="exact")
    assert exact.columns == ["article_id", "rank", "neighbour_id", "score", "segment_scores"]
    truth = lists(exact)
    mllib = top_k(df, 4, backend="mllib", mllib=MLlibParams(bucket_length=10.0, min_cosine=-1.0))
    assert mllib.columns == exact.columns
    assert {a: [n for _, n, _ in r] for a, r in lists(mllib).items()} == {a: [n for _, n, _ in r] for a, r in truth.items()}
    srp = lists(top_k(df, 4, params=LSHParams(hash="srp", bands=2, bits_per_band=1)))
    assert len(srp) == 60 and all(len(r) == 4 for r in srp.values())
    with pytest.raises(ValueError, match="backend must be one of"):
        top_k(df, 4, backend="faiss")


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
    with pytest.raises(ValueError, match=r"1 vector\(s\) hold NaN, inf or null, e.g. article_id a00002"):
        top_k(frame(spark, bad), 2)
    zero = clustered(4, 4, 2)
    zero[3] = 0
    with pytest.raises(ValueError, match=r"1 zero vector\(s\) have no direction, e.g. article_id a00003"):
        top_k(frame(spark, zero), 2)
    mixed = spark.createDataFrame([("a", [1.0, 0.0]), ("b", [1.0, 0.0, 0.0])], SCHEMA)
    with pytest.raises(ValueError, match="different lengths"):
        top_k(mixed, 1)
    null = spark.createDataFrame([("a", [1.0, 0.0]), ("b", None)], SCHEMA)
    with pytest.raises(ValueError, match=r"1 article\(s\) have a null vector, e.g. article_id b"):
        top_k(null, 1)
    twice = spark.createDataFrame([("a", [1.0, 0.0]), ("a", [0.0, 1.0]), ("b", [1.0, 1.0])], SCHEMA)
    with pytest.raises(ValueError, match=r"1 duplicate article_id"):
        top_k(twice, 1)
    for backend in ("exact", "mllib"):  # every backend: no rows for one item, all it can when k > n
        assert top_k(one, 5, backend=backend).count() == 0
        assert all(len(rows) == 2 for rows in lists(top_k(three, 10, backend=backend,
                                                           mllib=MLlibParams(bucket_length=10.0, min_cosine=-1.0))).values())


def test_incremental_update_equals_full_recompute(spark) -> None:  # type: ignore[no-untyped-def]
    """40 changed, 30 removed and 100 new articles: the update equals a full run with the same index."""
    rng = np.random.default_rng(3)
    v = clustered(1500, 16, 12, seed=21, spread=0.35)
    ids = [f"a{i:05d}" for i in range(1500)]
    old = frame(spark, v[:1400], ids[:1400])
    fitted = fit_index(old, LSHParams(target_bucket_size=40, probes=4, seed=5))
    before = top_k(old, 6, index=fitted).localCheckpoint()
    # the next day reads the index back from the warehouse
    ensure_tables(spark, "knn_index_test")
    index_id = save_index(spark, "knn_index_test", "text", fitted, "model-a", 1400, "run-1")
    saved = load_index(spark, "knn_index_test", "text")
    assert saved is not None and (saved.index_id, saved.model_id, saved.articles) == (index_id, "model-a", 1400)
    index = saved.index
    assert index.params == fitted.params and index.dim == fitted.dim
    assert encode_index(index)[0] == index_id and load_index(spark, "knn_index_test", "image") is None
    # the largest home bucket at the fit, measured and stored with the index
    def largest(vectors: np.ndarray) -> int:
        return int(np.bincount(probed_cells(vectors, fitted, 1)[:, 0, 0]).max())

    assert fitted.largest_bucket == index.largest_bucket == largest(v[:1400])
    changed = list(range(100, 140))
    v2 = v.copy()
    v2[changed] += 0.3 * rng.standard_normal((len(changed), 16)).astype(np.float32)
    v2 /= np.linalg.norm(v2, axis=1, keepdims=True)
    keep = [i for i in range(1500) if not 200 <= i < 230]
    now = frame(spark, v2[keep], [ids[i] for i in keep])
    new_or_changed = spark.createDataFrame([(ids[i],) for i in [*changed, *range(1400, 1500)]], "article_id string")
    update = update_top_k(now, before, new_or_changed, 6, index, max_affected_share=1.0)
    assert update.largest_bucket == largest(v2[keep])  # no bound given: measured
    updated = lists(update.applied(before))
    full = lists(top_k(now, 6, index=index))
    # it rewrote only some lists: the changed and new articles, those that listed a changed or
    # removed one, those a changed one entered; the removed articles' lists are gone
    rewritten = {r["article_id"] for r in update.lists.select("article_id").distinct().collect()}
    replaced = {r["article_id"] for r in update.replaced.collect()}
    assert not update.full and update.removed == 30 and update.touched > 0
    assert {ids[i] for i in [*changed, *range(1400, 1500)]} <= rewritten and len(rewritten) < len(keep)
    assert replaced == rewritten | {ids[i] for i in range(200, 230)}
    assert updated.keys() == full.keys() and len(full) == len(keep)
    for article, rows in full.items():
        assert [n for _, n, _ in updated[article]] == [n for _, n, _ in rows], article
        assert np.allclose([s for _, _, s in updated[article]], [s for _, _, s in rows], atol=1e-5)
    # the same update on the driver: the same lists rewritten, the same rows
    local = update_top_k(now, before, new_or_changed, 6, index, max_affected_share=1.0, on_driver=True)
    assert (local.full, local.affected, local.touched, local.removed, local.largest_bucket) == (
        False, update.affected, update.touched, 30, update.largest_bucket)
    assert {r["article_id"] for r in local.replaced.collect()} == replaced
    assert lists(local.lists).keys() == rewritten
    zero = v2[keep].copy()
    zero[5] = 0  # the driver's checks are prepare's, with its messages
    with pytest.raises(ValueError, match=r"1 zero vector\(s\) have no direction, e.g. article_id a00005"):
        update_top_k(frame(spark, zero, [ids[i] for i in keep]), before, new_or_changed, 6, index, on_driver=True)
    got = lists(local.applied(before))
    for article, rows in full.items():
        assert [n for _, n, _ in got[article]] == [n for _, n, _ in rows], article
        assert np.allclose([s for _, _, s in got[article]], [s for _, _, s in rows], atol=1e-5)
    # with the default share (30%) the 484 affected lists of 1,470 call for a full search instead
    # a bound above max_bucket_size allows a too-large bucket: measured (a bound within it skips
    # the measure: tests/spark/test_neighbours_refresh.py)
    bound = index.params.max_bucket_size + 1
    fallback = update_top_k(now, before, new_or_changed, 6, index, bucket_bound=bound)
    assert fallback.full and fallback.affected > 0.3 * len(keep) and fallback.largest_bucket == largest(v2[keep])
    on_driver = update_top_k(now, before, new_or_changed, 6, index, bucket_bound=bound, on_driver=True)
    assert on_driver.full and (on_driver.affected, on_driver.largest_bucket) == (fallback.affected, fallback.largest_bucket)
    assert {a: [n for _, n, _ in r] for a, r in lists(fallback.applied(before)).items()} == {
        a: [n for _, n, _ in r] for a, r in full.items()}
    # a day that only removes articles: no vector to ship as a candidate, the lists that held a
    # removed article searched again
    fewer = [i for i in keep if not 300 <= i < 310]
    later = frame(spark, v2[fewer], [ids[i] for i in fewer])
    no_change = spark.createDataFrame([], "article_id string")
    today = top_k(now, 6, index=index).localCheckpoint()
    pruned = update_top_k(later, today, no_change, 6, index)
    assert not pruned.full and pruned.removed == 10 and pruned.touched == 0 and pruned.affected > 0
    want = lists(top_k(later, 6, index=index))
    assert len(want) == len(fewer)
    for way in (pruned, update_top_k(later, today, no_change, 6, index, on_driver=True)):
        got = lists(way.applied(today))
        assert not way.full and way.removed == 10 and way.touched == 0 and got.keys() == want.keys()
        for article, rows in want.items():
            assert [n for _, n, _ in got[article]] == [n for _, n, _ in rows], article
            assert np.allclose([s for _, _, s in got[article]], [s for _, _, s in rows], atol=1e-5)
    # the update did real work: unchanged articles gained new neighbours and lost removed ones
    old_lists = lists(before)
    unchanged = [ids[i] for i in keep if i < 100 or 140 <= i < 1400]
    gained = sum(any(int(n[1:]) >= 1400 for _, n, _ in full[a]) for a in unchanged)
    lost = sum(any(200 <= int(n[1:]) < 230 for _, n, _ in old_lists[a]) for a in unchanged)
    assert gained > 0 and lost > 0, (gained, lost)


def test_no_cache_outlives_a_call(spark) -> None:  # type: ignore[no-untyped-def]
    """top_k (lsh with an exact top-up, and exact), update_top_k, fit_index and recall_at_k
    unpersist what they cached; their results stay usable after the caches are gone."""
    v = clustered(200, 8, 20, seed=13, spread=0.5)
    df = frame(spark, v)
    spark.catalog.clearCache()
    # one probe into small buckets leaves some articles short: the exact top-up runs too
    lsh = top_k(df, 5, params=LSHParams(target_bucket_size=10, probes=1, seed=2))
    assert cache_is_empty(spark)
    assert lsh.count() == 200 * 5
    assert top_k(df, 5, backend="exact").count() == 200 * 5
    assert cache_is_empty(spark)
    index = fit_index(df, LSHParams(target_bucket_size=20, probes=3, seed=2))
    assert cache_is_empty(spark)
    changed = spark.createDataFrame([(f"a{i:05d}",) for i in range(10)], "article_id string")
    before = top_k(df, 5, index=index)
    updated = update_top_k(df, before, changed, 5, index).applied(before)
    assert cache_is_empty(spark)
    assert updated.count() == 200 * 5
    assert recall_at_k(df, updated, 5, sample=20)["queries"] == 20
    assert cache_is_empty(spark)
