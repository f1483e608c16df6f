"""The neighbours stage as a daily refresh: the fitted LSH index is saved and reused, unchanged
vectors cost no search, and an incremental day equals a full recompute with the same index."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from delta.tables import DeltaTable
from pyspark.sql.types import ArrayType, FloatType, IntegerType, StringType, StructField, StructType

from recsys import state, tables
from recsys.knn import top_k
from recsys.knn.index import load_index
from recsys.stages import neighbours
from tests.conftest import test_config, write_table
from tests.unit.test_knn_kernels import clustered

pytestmark = pytest.mark.spark

DB = "neighbours_refresh"
EMBEDDING_SCHEMA = StructType([
    StructField("article_id", StringType()), StructField("modality", StringType()), StructField("model_id", StringType()),
    StructField("vector", ArrayType(FloatType(), False)), StructField("dim", IntegerType()),
    StructField("content_hash", StringType()),
])


def publish(spark, vectors: dict[str, np.ndarray], catalogue: list[str]) -> None:  # type: ignore[no-untyped-def]
    write_table(spark, DB, tables.ARTICLES, spark.createDataFrame(
        [(a, f"type{int(a[1:]) % 4}") for a in catalogue], "article_id string, category_l3 string"))
    write_table(spark, DB, tables.ITEM_EMBEDDINGS, spark.createDataFrame(
        # the content hash names the vector's input, as every writer of item_embeddings keeps it
        [(a, "metadata", "onehot@m1", v.tolist(), len(v), hashlib.sha256(v.tobytes()).hexdigest())
         for a, v in sorted(vectors.items())], EMBEDDING_SCHEMA))


def lists(spark) -> dict[str, list[tuple[str, float]]]:  # type: ignore[no-untyped-def]
    out: dict[str, list[tuple[str, float]]] = {}
    rows = tables.read(spark, DB, tables.ITEM_NEIGHBOURS).where("modality = 'metadata'").orderBy("article_id", "rank")
    for r in rows.collect():
        out.setdefault(r["article_id"], []).append((r["neighbour_id"], r["score"]))
    return out


def version(spark) -> int:  # type: ignore[no-untyped-def]
    return int(DeltaTable.forName(spark, f"{DB}.item_neighbours").history(1).first()["version"])


def test_incremental_day_equals_a_full_recompute_with_the_saved_index(spark, warehouse: Path) -> None:  # type: ignore[no-untyped-def]
    tables.ensure_tables(spark, DB)
    v = clustered(620, 16, 10, seed=8, spread=0.35)
    ids = [f"a{i:04d}" for i in range(620)]
    day1 = {ids[i]: v[i] for i in range(600)}
    publish(spark, day1, ids[:600])
    cfg = test_config(warehouse, DB, "text.enabled=false", "knn.modalities=[metadata]", "knn.recall_sample=0",
                      "quality.probe_max_iter=0", "knn.k=5", "knn.refit_share=0.2",
                      "knn.lsh.target_bucket_size=25", "knn.lsh.probes=4")
    first = neighbours.run(spark, cfg, "day-1")  # type: ignore[arg-type]
    assert first["metadata"]["mode"] == "full"
    # the one measuring pass after the write: counts and category precision of every list
    written = lists(spark)
    same = [int(a[1:]) % 4 == int(n[1:]) % 4 for a, rows in written.items() for n, _ in rows]
    assert (first["metadata"]["rows"], first["metadata"]["articles"]) == (len(same), 600) == (3000, 600)
    assert first["metadata"]["measured_on"] == "all lists"
    assert first["metadata"]["category_precision_at_k"] == round(sum(same) / len(same), 4)
    assert first["metadata"]["category_precision_common_at_k"] == first["metadata"]["category_precision_at_k"]
    saved = load_index(spark, DB, "metadata")
    assert saved is not None and saved.model_id == "onehot@m1" and saved.index_id == first["metadata"]["index_id"]
    assert state.consumed(spark, DB, "neighbours").versions == {
        "item_embeddings": state.table_version(spark, DB, tables.ITEM_EMBEDDINGS),
        "articles": state.table_version(spark, DB, tables.ARTICLES)}

    # nothing changed: no search, no write
    before = version(spark)
    again = neighbours.run(spark, cfg, "day-1")  # type: ignore[arg-type]
    assert again["metadata"]["mode"] == "unchanged" and version(spark) == before

    # day 2: 12 vectors change, 20 articles arrive, 8 leave the catalogue (their vectors stay behind)
    rng = np.random.default_rng(2)
    day2 = dict(day1)
    for i in range(100, 112):
        moved = v[i] + 0.4 * rng.standard_normal(16).astype(np.float32)
        day2[ids[i]] = moved / np.linalg.norm(moved)
    day2.update({ids[i]: v[i] for i in range(600, 620)})
    catalogue = [a for a in ids if not 300 <= int(a[1:]) < 308]
    publish(spark, day2, catalogue)
    # on the executors this time (the stage's other tests and the refresh tests update on the
    # driver); where an update runs is no reason to recompute every list
    distributed = cfg.model_copy(update={"knn": cfg.knn.model_copy(update={"driver_update_mb": 0})})  # type: ignore[attr-defined]
    update = neighbours.run(spark, distributed, "day-2")
    assert (update["metadata"]["mode"], update["metadata"]["changed"], update["metadata"]["removed"]) == ("update", 32, 8)
    assert update["metadata"]["index_id"] == saved.index_id  # the index was reused, not refitted
    assert update["metadata"]["on_driver"] is False
    # the buckets were not measured again: the fit's largest plus 32 changed vectors is a bound
    assert saved.index.largest_bucket is not None and saved.index.largest_bucket > 0
    assert update["metadata"]["largest_bucket_bound"] == saved.index.largest_bucket + 32
    assert "largest_bucket" not in update["metadata"]
    assert (update["metadata"]["rows"], update["metadata"]["articles"]) == (5 * len(catalogue), len(catalogue))
    assert update["metadata"]["measured_on"] == "rewritten lists"
    # measured on exactly the lists the update wrote (those carrying day 2), not on the slice
    rewritten = tables.read(spark, DB, tables.ITEM_NEIGHBOURS).where("modality = 'metadata' AND run_id = 'day-2'")
    same = [int(r["article_id"][1:]) % 4 == int(r["neighbour_id"][1:]) % 4 for r in rewritten.collect()]
    assert 0 < len(same) < 5 * len(catalogue)
    assert update["metadata"]["category_precision_at_k"] == round(sum(same) / len(same), 4)

    current = spark.createDataFrame([(a, day2[a].tolist()) for a in catalogue], "article_id string, vector array<float>")
    full = top_k(current, 5, index=saved.index).collect()
    expected: dict[str, list[tuple[str, float]]] = {}
    for r in sorted(full, key=lambda r: (r["article_id"], r["rank"])):
        expected.setdefault(r["article_id"], []).append((r["neighbour_id"], r["score"]))
    got = lists(spark)
    assert got.keys() == expected.keys() and len(got) == len(catalogue)
    for article, rows in expected.items():
        assert [n for n, _ in got[article]] == [n for n, _ in rows], article
        assert np.allclose([s for _, s in got[article]], [s for _, s in rows], atol=1e-6), article
    # one write replaced the modality's slice: a rewritten list carries day 2, the others were
    # copied as they were (day 1); every list that differs from day 1 was rewritten
    run_ids: dict[str, set[str]] = {}
    for r in tables.read(spark, DB, tables.ITEM_NEIGHBOURS).select("article_id", "run_id").collect():
        run_ids.setdefault(r["article_id"], set()).add(r["run_id"])
    assert all(len(r) == 1 for r in run_ids.values())
    kept = {a for a, r in run_ids.items() if r == {"day-1"}}
    assert kept and len(kept) < len(catalogue) and all(got[a] == written[a] for a in kept)
    assert all(run_ids[a] == {"day-2"} for a in catalogue if a not in written or got[a] != written[a])
    # the day's changes reached lists of unchanged articles
    gained = sum(any(int(n[1:]) >= 600 for n, _ in got[a]) for a in catalogue if int(a[1:]) < 100)
    assert gained > 0
    # the drift since the fit: the day's new, changed and removed vectors
    assert load_index(spark, DB, "metadata").changed_since_fit == 40  # type: ignore[union-attr]

    # 10 more vectors change: 1.7% of this run's vectors, but with the 40 of day 2, 8.3% of the 600
    # the index was fitted on, more than a refit_share of 8%: the drift calls for a refit
    day2b = dict(day2)
    for i in range(200, 210):
        day2b[ids[i]] = -day2[ids[i]]
    publish(spark, day2b, catalogue)
    last = state.consumed(spark, DB, "neighbours")
    changes = neighbours.changes_since(spark, cfg, {"metadata": "onehot@m1"}, last)  # type: ignore[arg-type]
    assert changes is not None and changes.n_changed == {"metadata": 10}
    strict = cfg.model_copy(update={"knn": cfg.knn.model_copy(update={"refit_share": 0.08})})  # type: ignore[attr-defined]
    how = neighbours.plan(spark, strict, "metadata", "onehot@m1", last, (), changes)
    assert how.mode == "full" and how.reason.startswith("8.3% of the vectors changed since the index was fitted")
    assert neighbours.plan(spark, cfg, "metadata", "onehot@m1", last, (), changes).mode == "update"
    changes.changed.unpersist()

    # more than refit_share changed: the plan is a refit, every list recomputed
    day3 = {a: -vec for a, vec in day2.items()}
    publish(spark, day3, catalogue)
    last = state.consumed(spark, DB, "neighbours")
    changes = neighbours.changes_since(spark, cfg, {"metadata": "onehot@m1"}, last)  # type: ignore[arg-type]
    assert changes is not None and changes.n_changed == {"metadata": len(catalogue)} and not changes.n_removed
    how = neighbours.plan(spark, cfg, "metadata", "onehot@m1", last, (), changes)  # type: ignore[arg-type]
    changes.changed.unpersist()
    assert how.mode == "full" and "knn.refit_share" in how.reason and how.n_changed == len(catalogue)
