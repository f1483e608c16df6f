"""The evaluation report without Spark: metric tables, charts, t-SNE, thumbnails and the page."""

from __future__ import annotations

import base64
import io
import math
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from threadpoolctl import threadpool_limits

from recsys.evaluation.report import (
    MAX_COLOURS,
    OTHER,
    Strip,
    StripItem,
    bar_chart,
    colour_groups,
    metrics_tables,
    render_html,
    thumbnail,
    tsne_embed,
    tsne_map,
)

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """t-SNE on a few dozen points: OpenMP/BLAS threads only add spin-waiting (seconds on a busy
    machine, where tests share the cores with Spark); one thread takes a fraction of a second.
    The limit applies to the libraries already loaded, so sklearn's OpenMP runtime is loaded first."""
    import sklearn.decomposition  # noqa: F401
    import sklearn.manifold  # noqa: F401

    with threadpool_limits(limits=1):
        yield

SYSTEMS = ["text", "fused_without_image", "popular", "behaviour", "fused_without_text", "recsys", "bought_together"]
VARIANTS = ["bought_together", "image", "fused_without_text", "fused", "text"]


def synthetic_metrics() -> dict[str, float]:
    """Every system and variant with distinct values; ``popular`` lacks ndcg, ``bought_together``
    (items) lacks category precision."""
    metrics: dict[str, float] = {
        "evaluate.k": 12.0,
        "evaluate.seconds": 93.25,
        "evaluate.split.train_transactions": 31_000.0,
        "evaluate.split.validation_customers": 1_234.0,
    }
    for i, system in enumerate(SYSTEMS):
        metrics[f"evaluate.ranking.{system}.map_at_k"] = 0.01 + i / 1000
        metrics[f"evaluate.ranking.{system}.recall_at_k"] = 0.05 + i / 100
        if system != "popular":
            metrics[f"evaluate.ranking.{system}.ndcg_at_k"] = 0.02 + i / 100
        metrics[f"evaluate.ranking.{system}.coverage"] = 0.5
        metrics[f"evaluate.ranking.{system}.customers"] = 1_234.0
    for i, variant in enumerate(VARIANTS):
        if variant != "bought_together":
            metrics[f"evaluate.items.{variant}.category_precision_at_k"] = 0.6 + i / 100
        metrics[f"evaluate.items.{variant}.copurchase_hit_rate_at_k"] = 0.1 + i / 100
        metrics[f"evaluate.items.{variant}.articles"] = 500.0 + i
    return metrics


def jpeg(path: Path, size: tuple[int, int] = (60, 240), colour: tuple[int, int, int] = (200, 30, 30)) -> Path:
    Image.new("RGB", size, colour).save(path, format="JPEG")
    return path


def test_metrics_tables_orders_rows_and_parses_every_figure() -> None:
    metrics = synthetic_metrics()
    ranking, items, split = metrics_tables(metrics)

    assert list(ranking.index) == [
        "recsys", "popular", "bought_together", "fused_without_text", "fused_without_image", "text", "behaviour"
    ]
    assert list(ranking.columns) == ["map_at_k", "recall_at_k", "ndcg_at_k", "coverage", "customers"]
    for i, system in enumerate(SYSTEMS):
        assert ranking.loc[system, "map_at_k"] == pytest.approx(0.01 + i / 1000)
        assert ranking.loc[system, "recall_at_k"] == pytest.approx(0.05 + i / 100)
    assert math.isnan(ranking.loc["popular", "ndcg_at_k"])
    assert ranking.loc["recsys", "ndcg_at_k"] == pytest.approx(0.02 + SYSTEMS.index("recsys") / 100)

    assert list(items.index) == ["fused", "fused_without_text", "text", "image", "bought_together"]
    assert list(items.columns) == ["category_precision_at_k", "copurchase_hit_rate_at_k", "articles"]
    assert math.isnan(items.loc["bought_together", "category_precision_at_k"])
    assert items.loc["fused", "articles"] == 500.0 + VARIANTS.index("fused")

    assert split.to_dict()["value"] == {"train_transactions": 31_000.0, "validation_customers": 1_234.0}


def test_metrics_tables_keeps_unknown_metrics_and_handles_no_figures() -> None:
    ranking, items, split = metrics_tables({"evaluate.ranking.recsys.mrr_at_k": 0.3, "other.thing": 1.0})
    assert list(ranking.columns)[-1] == "mrr_at_k"
    assert ranking.loc["recsys", "mrr_at_k"] == 0.3
    assert math.isnan(ranking.loc["recsys", "map_at_k"])
    assert items.empty and split.empty


def test_bar_chart_returns_a_png_and_skips_nan_rows() -> None:
    ranking, items, _ = metrics_tables(synthetic_metrics())
    png = bar_chart(ranking, "map_at_k", "MAP@12")
    assert png.startswith(PNG)
    with_nan = bar_chart(items, "category_precision_at_k", "precision")
    assert Image.open(io.BytesIO(with_nan)).format == "PNG"
    # one bar fewer (bought_together has no precision): a shorter figure than all five rows
    full = bar_chart(items, "copurchase_hit_rate_at_k", "hit rate")
    assert Image.open(io.BytesIO(with_nan)).height < Image.open(io.BytesIO(full)).height
    with pytest.raises(KeyError):
        bar_chart(ranking, "no_such_metric", "x")


def two_clusters(n: int = 30, d: int = 64, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    a = rng.normal(0.0, 0.1, size=(n, d)) + 5.0
    b = rng.normal(0.0, 0.1, size=(n, d)) - 5.0
    return np.vstack([a, b]).astype(np.float32), ["Trousers"] * n + ["Shoes"] * n


def test_tsne_embed_keeps_two_separated_clusters_apart() -> None:
    vectors, labels = two_clusters()
    xy = tsne_embed(vectors, seed=1)
    assert xy.shape == (60, 2) and xy.dtype == np.float32
    # every point's nearest 2-D neighbour is in its own cluster
    dist = np.linalg.norm(xy[:, None, :] - xy[None, :, :], axis=-1)
    np.fill_diagonal(dist, np.inf)
    nearest = dist.argmin(axis=1)
    assert all(labels[i] == labels[j] for i, j in enumerate(nearest))
    np.testing.assert_array_equal(xy, tsne_embed(vectors, seed=1))  # seeded: the same map


def test_tsne_map_returns_png_and_rejects_bad_input() -> None:
    vectors, labels = two_clusters(n=10, d=8)
    assert tsne_map(vectors, labels, seed=3).startswith(PNG)
    with pytest.raises(ValueError, match="labels"):
        tsne_map(vectors, labels[:-1])
    with pytest.raises(ValueError, match="at least"):
        tsne_embed(vectors[:4])


def test_colour_groups_colours_the_most_frequent_and_pools_the_rest() -> None:
    labels = [f"g{i:02d}" for i in range(20) for _ in range(i + 1)]  # g19 most frequent
    coloured, groups = colour_groups(labels)
    assert coloured == [f"g{i:02d}" for i in range(19, 19 - (MAX_COLOURS - 1), -1)]
    assert groups[0] == OTHER and groups[-1] == "g19"
    assert set(groups) == set(coloured) | {OTHER}
    few, few_groups = colour_groups(["b", "a", "b"])
    assert few == ["b", "a"] and few_groups == ["b", "a", "b"]


def test_thumbnail_shrinks_to_height_and_handles_missing_files(tmp_path: Path) -> None:
    path = jpeg(tmp_path / "0001.jpg", size=(60, 240))
    uri = thumbnail(str(path))
    assert uri is not None and uri.startswith("data:image/jpeg;base64,")
    image = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert image.size == (30, 120)
    assert thumbnail(f"file:{path}") is not None  # Spark's file index writes file: URIs
    assert thumbnail(None) is None
    assert thumbnail(str(tmp_path / "gone.jpg")) is None
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    assert thumbnail(str(tmp_path / "broken.jpg")) is None


def test_render_html_formats_escapes_inlines_and_references_nothing(tmp_path: Path) -> None:
    image = jpeg(tmp_path / "0002.jpg")
    strip = Strip(
        StripItem("0002", "Query <b>& dress", "Dress", str(image)),
        (
            StripItem("0003", "No picture", "Skirt", None, 0.87654),
            StripItem("0004", "Lost picture", "Top", str(tmp_path / "gone.jpg"), 0.5),
        ),
    )
    metrics = synthetic_metrics()
    metrics["evaluate.ranking.recsys.map_at_k"] = 0.01234
    page = render_html("run-<1>", metrics, tsne_map(*two_clusters(n=10, d=8)), [strip])

    assert page.startswith("<!DOCTYPE html>")
    assert "<td>0.0123</td>" in page
    assert "<th>MAP@12</th>" in page and "<th>Co-purchase hit rate@12</th>" in page
    assert "<td>31,000</td>" in page  # a split count, as an int
    assert "evaluate.seconds" in page and "<td>93.2500</td>" in page
    assert "Query &lt;b&gt;&amp; dress" in page and "<b>&" not in page
    assert "run-&lt;1&gt;" in page
    assert "score 0.8765" in page
    assert page.count('class="placeholder"') == 2  # no image path, unreadable image
    assert page.count("data:image/jpeg;base64,") == 1
    # charts: MAP, category precision, co-purchase hit rate, and the t-SNE map
    assert page.count("data:image/png;base64,") == 4
    assert not re.search(r"https?://", page)
    assert "<script" not in page.lower()
    # blank cell for the missing figure (popular has no NDCG)
    popular = re.search(r"<tr><td>popular</td>(.*?)</tr>", page)
    assert popular is not None and "<td></td>" in popular.group(1)


def test_render_html_without_map_or_strips_says_so() -> None:
    page = render_html("r", {"evaluate.k": 12.0}, None, [])
    assert "skipped" in page and "no sample articles" in page
    assert "data:image" not in page
