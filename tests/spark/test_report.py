"""The report end to end on tiny synthetic Delta tables: samples from the tables, then the page."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from threadpoolctl import threadpool_limits

from recsys import tables
from recsys.evaluation.report import collect_inputs, write_report
from tests.conftest import test_config

pytestmark = pytest.mark.spark

DB = "report_test"
GROUPS = ("Trousers", "Shoes", "Dress")
N = 12  # articles 0..11; the even ones have an image; 0..5 have recommendations


def aid(i: int) -> str:
    return f"{i:010d}"


def save(spark, spec: tables.TableSpec, rows: list[tuple]) -> None:  # type: ignore[no-untyped-def]
    """One write per table (cheaper than ``ensure_tables`` + ``merge`` for a test's three tables)."""
    df = tables.conform(spark.createDataFrame(rows, spec.schema), spec)
    df.write.format("delta").mode("overwrite").saveAsTable(tables.qualified(DB, spec))


def write_tables(spark, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spark.sql(f"CREATE DATABASE IF NOT EXISTS {DB}")
    now = dt.datetime(2024, 1, 1)
    articles = []
    for i in range(N):
        image = None
        if i % 2 == 0:
            path = tmp_path / f"{aid(i)}.jpg"
            Image.new("RGB", (40, 60), (20 * i, 100, 100)).save(path, format="JPEG")
            image = f"file:{path}"
        articles.append((aid(i), None, f"Article <{i}> & co", "", "Garment", GROUPS[i % 3], f"type{i % 3}", "Black",
                         {}, image, "test", "h", now, "r0"))
    save(spark, tables.ARTICLES, articles)

    rows = []
    for i in range(N):
        vector = [float(i), float(i % 3)] + [0.0] * 6  # the article's index, then its group
        rows.append((aid(i), "fused", "fused-1", vector, 8, "h", "r0"))
    rows.append((aid(0), "fused", "fused-0", [99.0] * 8, 8, "h", "r-old"))  # an older fusion, fewer rows
    rows.append((aid(99), "fused", "fused-1", [99.0] * 8, 8, "h", "r0"))  # not a current article
    rows.append((aid(1), "text", "t", [99.0] * 8, 8, "h", "r0"))
    save(spark, tables.ITEM_EMBEDDINGS, rows)

    recs = [
        (aid(q), rank, aid((q + rank) % N), 1.0 - rank / 10, {}, "r0")
        for q in range(6)
        for rank in (1, 2, 3)
    ]
    save(spark, tables.ITEM_RECOMMENDATIONS, recs)


def test_collect_inputs_and_write_report(spark, warehouse: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    write_tables(spark, tmp_path)
    cfg = test_config(
        warehouse, DB, f"evaluate.report_dir={tmp_path / 'reports'}", "evaluate.tsne_sample=10",
        "evaluate.strips=2", "evaluate.seed=7", "knn.k=2",
    )

    vectors, labels, strips = collect_inputs(spark, cfg, sample=100, strips=100, seed=7)
    # every current article's vector of the majority fused model, labelled with its group
    assert vectors.shape == (N, 8) and vectors.dtype == np.float32
    assert sorted(vectors[:, 0].astype(int)) == list(range(N))
    assert labels == [GROUPS[int(i) % 3] for i in vectors[:, 0]]
    # the articles with recommendations, those with an image first; ranks 1..knn.k in order
    queries = [s.query.article_id for s in strips]
    assert sorted(queries) == [aid(i) for i in range(6)]
    assert all(s.query.image_path for s in strips[:3]) and not any(s.query.image_path for s in strips[3:])
    for s in strips:
        q = int(s.query.article_id)
        assert [item.article_id for item in s.items] == [aid((q + 1) % N), aid((q + 2) % N)]
        assert [item.score for item in s.items] == pytest.approx([0.9, 0.8])
        assert s.items[0].name == f"Article <{(q + 1) % N}> & co" and s.items[0].category == f"type{(q + 1) % 3}"

    import sklearn.manifold  # noqa: F401  (load its OpenMP runtime so the limit below applies to it)

    with threadpool_limits(limits=1):  # t-SNE of 10 points: threads only add spin-waiting on a busy machine
        path = write_report(spark, cfg, "run-1", {"evaluate.k": 2.0, "evaluate.ranking.recsys.map_at_k": 0.25})
    assert path == tmp_path / "reports" / "run-1" / "index.html"
    page = path.read_text(encoding="utf-8")
    assert "<td>0.2500</td>" in page and "MAP@2" in page
    assert page.count('class="strip"') == 2
    # the same seed samples the same articles: the first two strips above (those with images)
    assert re.findall(r'class="card query">.*?<b>(\d+)</b>', page) == queries[:2]
    assert page.count("data:image/png;base64,") == 2  # the MAP chart and the t-SNE map
    # two query images (even ids) plus the recommended even-id articles; odd ids are placeholders
    assert page.count("data:image/jpeg;base64,") + page.count('class="placeholder"') == 2 * 3
    assert "Article &lt;" in page
