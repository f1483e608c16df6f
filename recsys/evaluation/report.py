"""The evaluation report: one self-contained HTML page per run, ``reports/<run_id>/index.html``.

The page holds the ``evaluate`` stage's figures as tables (customer-level ranking metrics per
system, item-to-item quality per variant, the split's counts), bar charts of MAP@K, category
precision@K and co-purchase hit rate@K, a t-SNE map of a sample of the fused vectors coloured by
product group (van der Maaten & Hinton 2008, "Visualizing Data using t-SNE", JMLR 9), and strips
of sample articles with their recommended articles' images.

Everything is inlined (PNG charts and JPEG thumbnails as base64 ``data:`` URIs, CSS in a
``<style>`` element, no JavaScript), so the file can be mailed or archived on its own. Text from
the data (names, categories, ids) is HTML-escaped.

matplotlib, scikit-learn and Pillow are the wheel's ``report`` extra; they are imported inside
the functions that need them, so ``import recsys.evaluation.report`` works without them. Charts are drawn on
matplotlib's Agg canvas without pyplot (headless, and a notebook's backend is left alone).
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np
import pandas as pd
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from recsys import tables
from recsys.config import MODALITIES, Config

__all__ = [
    "Strip",
    "StripItem",
    "bar_chart",
    "collect_inputs",
    "colour_groups",
    "column_title",
    "metrics_tables",
    "render_html",
    "thumbnail",
    "tsne_embed",
    "tsne_map",
    "write_report",
]

logger = logging.getLogger(__name__)

PREFIX = "evaluate."
RANKING_METRICS = ("map_at_k", "recall_at_k", "ndcg_at_k", "coverage", "customers")
ITEM_METRICS = ("category_precision_at_k", "copurchase_hit_rate_at_k", "articles")
# columns shown as whole numbers; every other figure is shown with 4 decimals
COUNT_COLUMNS = frozenset({"customers", "articles"})
BASELINES = ("popular", "bought_together")
MIN_TSNE_POINTS = 5
MAX_COLOURS = 12
OTHER = "other"

_TITLES = {
    "map_at_k": "MAP@{k}",
    "recall_at_k": "Recall@{k}",
    "ndcg_at_k": "NDCG@{k}",
    "coverage": "Coverage",
    "customers": "Customers",
    "category_precision_at_k": "Category precision@{k}",
    "copurchase_hit_rate_at_k": "Co-purchase hit rate@{k}",
    "articles": "Articles",
}


# ---------------------------------------------------------------------------------------- tables


def _modality_rank(name: str) -> tuple[int, str]:
    return (MODALITIES.index(name), "") if name in MODALITIES else (len(MODALITIES), name)


def _system_order(name: str) -> tuple[int, int, str]:
    """Sort key: recsys, baselines, fused, leave-one-out, single modalities, anything else."""
    if name == "recsys":
        return (0, 0, "")
    if name in BASELINES:
        return (1, BASELINES.index(name), "")
    if name == "fused":
        return (2, 0, "")
    if name.startswith("fused_without_"):
        return (3, *_modality_rank(name.removeprefix("fused_without_")))
    if name in MODALITIES:
        return (4, *_modality_rank(name))
    return (5, 0, name)


def _variant_order(name: str) -> tuple[int, int, str]:
    """Sort key: fused, leave-one-out, single modalities, bought_together, anything else."""
    if name == "fused":
        return (0, 0, "")
    if name.startswith("fused_without_"):
        return (1, *_modality_rank(name.removeprefix("fused_without_")))
    if name in MODALITIES:
        return (2, *_modality_rank(name))
    if name == "bought_together":
        return (3, 0, "")
    return (4, 0, name)


def _pivot(
    metrics: dict[str, float], section: str, known: Sequence[str], order: Callable[[str], tuple[int, int, str]]
) -> pd.DataFrame:
    prefix = f"{PREFIX}{section}."
    cells: dict[str, dict[str, float]] = {}
    for name, value in metrics.items():
        if not name.startswith(prefix):
            continue
        row, _, column = name.removeprefix(prefix).rpartition(".")
        if row and column:
            cells.setdefault(row, {})[column] = float(value) if value is not None else math.nan
    columns = list(known) + sorted({c for r in cells.values() for c in r} - set(known))
    rows = sorted(cells, key=order)
    table = pd.DataFrame(
        [[cells[r].get(c, math.nan) for c in columns] for r in rows], index=rows, columns=columns, dtype="float64"
    )
    table.index.name = "system" if section == "ranking" else "variant"
    return table


def metrics_tables(metrics: dict[str, float]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Pivot the ``evaluate.*`` figures into the report's three tables.

    Args:
        metrics: flattened names to values, e.g. ``evaluate.ranking.recsys.map_at_k``,
            ``evaluate.items.fused.category_precision_at_k``, ``evaluate.split.customers``.
            Other names are ignored here.

    Returns:
        ``(ranking, items, split)``, float64 frames:

        - ``ranking``: one row per system (index ``system``: recsys, then the baselines popular
          and bought_together, then fused, the leave-one-out ``fused_without_<m>``, the single
          modalities, anything else by name); columns ``map_at_k``, ``recall_at_k``,
          ``ndcg_at_k``, ``coverage``, ``customers`` and any other metric found.
        - ``items``: one row per item variant (index ``variant``: fused, leave-one-out, single
          modalities, bought_together, anything else); columns ``category_precision_at_k``,
          ``copurchase_hit_rate_at_k``, ``articles`` and any other metric found.
        - ``split``: one row per ``evaluate.split.<name>`` (index ``name``, sorted), column ``value``.

        A figure a row lacks is NaN. Frames are empty (with the known columns) when no figure of
        their kind is present.
    """
    ranking = _pivot(metrics, "ranking", RANKING_METRICS, _system_order)
    items = _pivot(metrics, "items", ITEM_METRICS, _variant_order)
    prefix = f"{PREFIX}split."
    names = sorted(n for n in metrics if n.startswith(prefix))
    split = pd.DataFrame(
        {"value": [float(metrics[n]) for n in names]}, index=[n.removeprefix(prefix) for n in names], dtype="float64"
    )
    split.index.name = "name"
    return ranking, items, split


def _k(metrics: dict[str, float]) -> str:
    value = metrics.get(f"{PREFIX}k")
    if value is None or not math.isfinite(value):
        return "K"
    return str(int(value)) if float(value).is_integer() else str(value)


def column_title(column: str, k: str) -> str:
    """Display title of a metric column, e.g. ``map_at_k`` with ``k="12"`` → ``MAP@12``."""
    template = _TITLES.get(column)
    if template is None:
        return column.replace("_at_k", f"@{k}").replace("_", " ")
    return template.format(k=k)


def _format(value: float | None, count: bool | None) -> str:
    """4 decimals, or a whole number with ``count``; ``count=None``: whole when the value is."""
    if value is None or not math.isfinite(value):
        return ""
    if count is None:
        count = float(value).is_integer()
    return f"{int(round(value)):,}" if count else f"{value:.4f}"


# ---------------------------------------------------------------------------------------- charts


def _figure(width: float, height: float) -> Any:
    """A matplotlib ``Figure`` drawn by the Agg canvas, outside pyplot.

    No pyplot, so no global backend switch or figure registry: the charts render headless and
    leave a notebook's own matplotlib backend as it was (matplotlib's "embedding in a web
    application server" recipe).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    # no Software text chunk: the page should not even mention a URL
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return buffer.getvalue()


def bar_chart(table: pd.DataFrame, column: str, title: str) -> bytes:
    """A horizontal bar chart of one metric column, one bar per row, in the table's order.

    The first row (recsys, or fused for items) is drawn in a stronger colour; rows whose value is
    NaN are left out. Values are written at the end of the bars (4 decimals).

    Args:
        table: a frame from :func:`metrics_tables`; its index labels the bars.
        column: the column to draw, e.g. ``map_at_k``.
        title: chart title, e.g. ``MAP@12 per ranking system``.

    Returns:
        PNG bytes (Agg backend, 100 dpi). A table without a finite value gives a chart that
        says so.

    Raises:
        KeyError: if ``column`` is not a column of ``table``.
    """
    values = table[column].astype("float64")
    shown = values[np.isfinite(values.to_numpy())]
    figure = _figure(7.0, 0.9 + 0.32 * max(len(shown), 1))
    axes = figure.subplots()
    if shown.empty:
        axes.text(0.5, 0.5, "no data", ha="center", va="center", transform=axes.transAxes)
        axes.set_yticks([])
    else:
        labels = [str(i) for i in shown.index]
        colours = ["#1f77b4" if i == 0 else "#9ecae1" for i in range(len(shown))]
        positions = np.arange(len(shown))
        axes.barh(positions, shown.to_numpy(), color=colours)
        axes.set_yticks(positions, labels)
        axes.invert_yaxis()
        top = float(shown.max())
        axes.set_xlim(0, top * 1.18 if top > 0 else 1.0)
        for y, v in zip(positions, shown.to_numpy(), strict=True):
            axes.text(v, y, f" {v:.4f}", va="center", fontsize=8)
    axes.set_title(title)
    axes.spines[["top", "right"]].set_visible(False)
    return _png(figure)


def tsne_embed(vectors: np.ndarray, seed: int = 42) -> np.ndarray:
    """2-D t-SNE coordinates of ``vectors`` (van der Maaten & Hinton 2008).

    Vectors are first reduced to 50 dimensions with PCA when ``d > 50`` and ``n > 50`` (sklearn
    ``PCA``, ``random_state=seed``), then embedded with sklearn's
    ``TSNE(init="pca", random_state=seed)`` at perplexity ``min(30, (n - 1) / 3)`` (it must be
    below ``n``).

    Args:
        vectors: ``(n, d)`` float32 (any float dtype is accepted), e.g. L2-normalised fused vectors.
        seed: seeds PCA and t-SNE, so the same input gives the same map.

    Returns:
        ``(n, 2)`` float32 coordinates (unitless; only neighbourhoods are meaningful).

    Raises:
        ValueError: if ``vectors`` is not 2-D or has fewer than :data:`MIN_TSNE_POINTS` rows.
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = np.asarray(vectors, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"vectors must be 2-D (n, d), got shape {x.shape}")
    n = x.shape[0]
    if n < MIN_TSNE_POINTS:
        raise ValueError(f"t-SNE needs at least {MIN_TSNE_POINTS} vectors, got {n}")
    if x.shape[1] > 50 and n > 50:
        x = PCA(n_components=50, random_state=seed).fit_transform(x).astype(np.float32)
    tsne = TSNE(n_components=2, init="pca", perplexity=min(30.0, (n - 1) / 3), random_state=seed)
    return np.asarray(tsne.fit_transform(x), dtype=np.float32)


def colour_groups(labels: Sequence[str], max_colours: int = MAX_COLOURS) -> tuple[list[str], list[str]]:
    """Which labels get a colour of their own.

    Args:
        labels: one category string per point.
        max_colours: the most colours used, ``other`` included.

    Returns:
        ``(coloured, groups)``: the labels that get a colour, most frequent first (ties by name),
        all of them when there are at most ``max_colours`` distinct labels, else the
        ``max_colours - 1`` most frequent; and each point's group: its label, or :data:`OTHER`.
    """
    names = [str(label) for label in labels]
    counts = pd.Series(names, dtype="object").value_counts()
    ordered = sorted(counts.index, key=lambda label: (-int(counts[label]), label))
    coloured = ordered if len(ordered) <= max_colours else ordered[: max_colours - 1]
    keep = set(coloured)
    return coloured, [name if name in keep else OTHER for name in names]


def tsne_map(vectors: np.ndarray, labels: Sequence[str], seed: int = 42) -> bytes:
    """A 2-D t-SNE map of ``vectors`` coloured by ``labels``, with a legend.

    Coordinates come from :func:`tsne_embed`; colours from :func:`colour_groups` (at most
    :data:`MAX_COLOURS`, the rest grey as ``other``).

    Args:
        vectors: ``(n, d)`` float32, e.g. L2-normalised fused vectors.
        labels: ``n`` category strings (the product group), aligned with the rows.
        seed: seeds PCA and t-SNE.

    Returns:
        PNG bytes.

    Raises:
        ValueError: if ``vectors`` is not 2-D, has fewer than :data:`MIN_TSNE_POINTS` rows, or
            its row count differs from ``len(labels)``.
    """
    n = int(np.shape(vectors)[0]) if np.ndim(vectors) else 0
    if len(labels) != n:
        raise ValueError(f"{n} vectors but {len(labels)} labels")
    xy = tsne_embed(vectors, seed)
    coloured, groups = colour_groups(labels)
    names = np.array(groups, dtype=object)
    from matplotlib import colormaps

    palette = colormaps["tab20" if len(coloured) > 10 else "tab10"]
    figure = _figure(9.0, 7.0)
    axes = figure.subplots()
    if OTHER in set(names) and OTHER not in coloured:
        mask = names == OTHER
        axes.scatter(xy[mask, 0], xy[mask, 1], s=6, c="#c8c8c8", label=f"{OTHER} ({int(mask.sum())})")
    for i, label in enumerate(coloured):
        mask = names == label
        axes.scatter(xy[mask, 0], xy[mask, 1], s=6, color=palette(i % palette.N), label=f"{label} ({int(mask.sum())})")
    axes.set_title(f"t-SNE of {n:,} fused vectors, by product group")
    axes.set_xticks([])
    axes.set_yticks([])
    handles, texts = axes.get_legend_handles_labels()
    if texts and texts[0].startswith(f"{OTHER} ("):  # drawn first (underneath), listed last
        handles, texts = handles[1:] + handles[:1], texts[1:] + texts[:1]
    axes.legend(handles, texts, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, markerscale=2.5,
                frameon=False)
    return _png(figure)


# ------------------------------------------------------------------------------------ thumbnails


def _local_path(path: str) -> str:
    """A local file path for ``path``: ``file:`` URIs decoded, ``dbfs:/x`` → ``/dbfs/x``."""
    if path.startswith("file:"):
        return unquote(urlparse(path).path)
    if path.startswith("dbfs:/"):
        return "/dbfs/" + path.removeprefix("dbfs:/").lstrip("/")
    return path


def thumbnail(path: str | None, height: int = 120) -> str | None:
    """A JPEG thumbnail of the image at ``path`` as a ``data:image/jpeg;base64,...`` URI.

    The image is converted to RGB and shrunk (never enlarged) to at most ``height`` pixels high
    and ``4 * height`` wide, keeping its aspect ratio (PIL ``Image.thumbnail``).

    Args:
        path: a local path or a ``file:`` URI (as Spark's file index writes them); ``dbfs:/``
            paths are read through the ``/dbfs`` mount. Other URIs cannot be read here.
        height: maximum height in pixels.

    Returns:
        The data URI, or ``None`` when ``path`` is null, missing or not a readable image (the
        page then shows a placeholder).
    """
    if not path:
        return None
    from PIL import Image

    try:
        with Image.open(_local_path(path)) as image:
            image.draft("RGB", (1, height))  # JPEG: decode at a reduced scale when possible
            rgb = image.convert("RGB")
        rgb.thumbnail((4 * height, height))
        buffer = io.BytesIO()
        rgb.save(buffer, format="JPEG", quality=85)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        logger.debug("no thumbnail for %s: %s", path, err)
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# ---------------------------------------------------------------------------------------- strips


@dataclass(frozen=True)
class StripItem:
    """One article in a recommendation strip.

    Attributes:
        article_id: the article key.
        name: display name (may be null).
        category: finest category (``category_l3``, may be null).
        image_path: path or URI of the image; null when the article has none.
        score: the recommendation's fused cosine; ``None`` for the query article.
    """

    article_id: str
    name: str | None
    category: str | None
    image_path: str | None
    score: float | None = None


@dataclass(frozen=True)
class Strip:
    """A query article and its recommended articles, in rank order."""

    query: StripItem
    items: tuple[StripItem, ...]


def collect_inputs(
    spark: SparkSession, cfg: Config, sample: int, strips: int, seed: int
) -> tuple[np.ndarray, list[str], list[Strip]]:
    """Read what the report draws from the tables: a sample of fused vectors and sample strips.

    Samples are deterministic: articles are ordered by ``xxhash64(article_id, seed)`` (then id)
    and the first ones taken, in Spark; only the sample reaches the driver.

    Args:
        cfg: ``data.database`` names the tables; ``knn.k`` bounds the recommendations per strip.
        sample: at most this many current articles' fused vectors (``item_embeddings`` rows with
            ``modality = 'fused'``; when more than one fused model is stored, the one with the
            most rows). 0 reads none.
        strips: at most this many query articles that have rows in ``item_recommendations``;
            articles with an image come first, articles without one fill up (they show
            placeholders). 0 reads none.
        seed: the hash seed of both samples.

    Returns:
        ``(vectors, labels, strips)``: ``vectors`` ``(n, d)`` float32 (``(0, 0)`` when there are
        no fused vectors), ``labels`` the ``n`` articles' ``category_l2`` (``unknown`` when
        null), and the strips in sample order, each with its recommendations by rank (ranks
        ``1..knn.k``).
    """
    db = cfg.data.database
    articles = tables.read(spark, db, tables.ARTICLES)
    vectors = np.zeros((0, 0), dtype=np.float32)
    labels: list[str] = []
    if sample > 0:
        fused = tables.read(spark, db, tables.ITEM_EMBEDDINGS).where(F.col("modality") == "fused")
        model = fused.groupBy("model_id").count().orderBy(F.desc("count"), "model_id").first()
        if model is not None:
            rows = (
                fused.where(F.col("model_id") == model["model_id"])
                .join(articles.select("article_id", "category_l2"), "article_id")
                .orderBy(F.xxhash64("article_id", F.lit(seed)), "article_id")
                .limit(sample)
                .select("vector", F.coalesce("category_l2", F.lit("unknown")).alias("label"))
                .collect()
            )
            if rows:
                vectors = np.asarray([r["vector"] for r in rows], dtype=np.float32)
                labels = [str(r["label"]) for r in rows]

    result: list[Strip] = []
    if strips > 0:
        recs = tables.read(spark, db, tables.ITEM_RECOMMENDATIONS)
        queries = (
            articles.join(recs.select("article_id"), "article_id", "left_semi")
            .orderBy(F.col("image_path").isNull(), F.xxhash64("article_id", F.lit(seed)), "article_id")
            .limit(strips)
            .select("article_id", "name", "category_l3", "image_path")
            .collect()
        )
        ids = [q["article_id"] for q in queries]
        listed: dict[str, list[StripItem]] = {i: [] for i in ids}
        if ids:
            info = articles.select(
                F.col("article_id").alias("recommended_id"), "name", "category_l3", "image_path"
            )
            for r in (
                recs.where(F.col("article_id").isin(*ids) & (F.col("rank") <= cfg.knn.k))
                .join(info, "recommended_id", "left")
                .select("article_id", "rank", "recommended_id", "score", "name", "category_l3", "image_path")
                .orderBy("article_id", "rank")
                .collect()
            ):
                listed[r["article_id"]].append(
                    StripItem(
                        r["recommended_id"],
                        r["name"],
                        r["category_l3"],
                        r["image_path"],
                        None if r["score"] is None else float(r["score"]),
                    )
                )
        result = [
            Strip(StripItem(q["article_id"], q["name"], q["category_l3"], q["image_path"]), tuple(listed[q["article_id"]]))
            for q in queries
        ]
    return vectors, labels, result


# ------------------------------------------------------------------------------------------ html

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 0.9em; }
th, td { padding: 4px 10px; border-bottom: 1px solid #eee; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { border-bottom: 2px solid #999; }
tr.first td { font-weight: 600; }
.charts img { display: block; margin: 8px 0; max-width: 100%; }
.strip { display: flex; gap: 8px; overflow-x: auto; padding: 8px 0 12px; border-bottom: 1px solid #eee; }
.card { flex: 0 0 auto; width: 124px; font-size: 0.72em; }
.card.query { border-right: 3px solid #1f77b4; padding-right: 8px; }
.card img { display: block; height: 120px; max-width: 124px; object-fit: contain; background: #fafafa; }
.placeholder { height: 120px; width: 90px; background: #d0d0d0; color: #555; display: flex; align-items: center;
  justify-content: center; text-align: center; padding: 4px; overflow: hidden; box-sizing: border-box; }
.caption { margin-top: 3px; overflow-wrap: anywhere; }
.muted { color: #777; }
"""


def _e(text: object) -> str:
    return html.escape("" if text is None else str(text), quote=True)


def _table_html(table: pd.DataFrame, k: str, label: str, counts: bool | None = False) -> str:
    """``counts``: False → metric columns (4 decimals, :data:`COUNT_COLUMNS` whole); True → all whole;
    None → whole where the value is."""
    if table.empty:
        return '<p class="muted">no figures</p>'
    head = "".join(f"<th>{_e(column_title(c, k))}</th>" for c in table.columns)
    rows = []
    for i, (name, row) in enumerate(table.iterrows()):
        cells = "".join(
            f"<td>{_e(_format(float(row[c]), (c in COUNT_COLUMNS) if counts is False else counts))}</td>"
            for c in table.columns
        )
        first = i == 0 and counts is False  # recsys / fused, the row the others are compared with
        rows.append(f'<tr{" class=first" if first else ""}><td>{_e(name)}</td>{cells}</tr>')
    return f"<table><thead><tr><th>{_e(label)}</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _image_html(png: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _card_html(item: StripItem, query: bool) -> str:
    uri = thumbnail(item.image_path)
    name = item.name or item.article_id
    picture = f'<img alt="{_e(name)}" src="{uri}">' if uri else f'<div class="placeholder">{_e(name)}</div>'
    score = "query" if query else ("" if item.score is None else f"score {item.score:.4f}")
    caption = (
        f"<b>{_e(item.article_id)}</b><br>{_e(item.name)}<br>"
        f'<span class="muted">{_e(item.category)}</span><br>{_e(score)}'
    )
    return f'<div class="card{" query" if query else ""}">{picture}<div class="caption">{caption}</div></div>'


def _charts_html(ranking: pd.DataFrame, items: pd.DataFrame, k: str) -> str:
    charts = []
    for table, column, title in (
        (ranking, "map_at_k", f"MAP@{k} per ranking system"),
        (items, "category_precision_at_k", f"Category precision@{k} per item variant"),
        (items, "copurchase_hit_rate_at_k", f"Co-purchase hit rate@{k} per item variant"),
    ):
        if column in table.columns and table[column].notna().any():
            charts.append(_image_html(bar_chart(table, column, title), title))
    return f'<div class="charts">{"".join(charts)}</div>' if charts else '<p class="muted">no figures to chart</p>'


def render_html(run_id: str, metrics: dict[str, float], tsne_png: bytes | None, strips: list[Strip]) -> str:
    """The whole report page as one self-contained HTML string.

    Args:
        run_id: the evaluated run, shown in the title.
        metrics: the flattened ``evaluate.*`` figures (see :func:`metrics_tables`); names under
            ``evaluate.`` that are not ``k``, ``split``, ``ranking`` or ``items`` figures are listed
            in an "other figures" table.
        tsne_png: the map from :func:`tsne_map`, or ``None`` to say it was skipped.
        strips: sample recommendation strips; images are read and thumbnailed here (a missing or
            unreadable image gives a grey placeholder with the name).

    Returns:
        UTF-8 HTML5 text with every image inlined as a ``data:`` URI, no script and no reference
        to another file or URL.
    """
    ranking, items, split = metrics_tables(metrics)
    k = _k(metrics)
    sections = ("split.", "ranking.", "items.")
    others = sorted(
        n for n in metrics if n.startswith(PREFIX) and n != f"{PREFIX}k" and not n.removeprefix(PREFIX).startswith(sections)
    )
    other = pd.DataFrame({"value": [float(metrics[n]) for n in others]}, index=others, dtype="float64")

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>recsys evaluation: {_e(run_id)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>recsys evaluation report: run {_e(run_id)}</h1>",
        f'<p class="muted">K = {_e(k)}. Ranking metrics are per customer on the validation window; '
        "item metrics compare each article's top-K list with its category and with articles bought with it.</p>",
        "<h2>Customer ranking: recsys against baselines</h2>",
        _table_html(ranking, k, "system"),
        "<h2>Item-to-item quality per variant</h2>",
        _table_html(items, k, "variant"),
        "<h2>Split</h2>",
        _table_html(split, k, "name", counts=True),
    ]
    if not other.empty:
        parts += ["<h3>Other figures</h3>", _table_html(other, k, "name", counts=None)]
    parts += ["<h2>Charts</h2>", _charts_html(ranking, items, k), "<h2>Fused embedding space (t-SNE)</h2>"]
    if tsne_png is None:
        parts.append('<p class="muted">skipped: too few fused vectors (or evaluate.tsne_sample is 0)</p>')
    else:
        parts.append(f'<div class="charts">{_image_html(tsne_png, "t-SNE map of fused vectors")}</div>')
    parts.append("<h2>Sample recommendations</h2>")
    if not strips:
        parts.append('<p class="muted">no sample articles with recommendations</p>')
    for strip in strips:
        cards = [_card_html(strip.query, query=True)] + [_card_html(item, query=False) for item in strip.items]
        parts.append(f'<div class="strip">{"".join(cards)}</div>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(spark: SparkSession, cfg: Config, run_id: str, metrics: dict[str, float]) -> Path:
    """Write ``<evaluate.report_dir>/<run_id>/index.html`` for a run's ``evaluate`` figures.

    Reads the samples with :func:`collect_inputs` (``evaluate.tsne_sample`` fused vectors,
    ``evaluate.strips`` strips, seeded by ``evaluate.seed``), draws the t-SNE map when there are
    at least :data:`MIN_TSNE_POINTS` vectors, renders the page with :func:`render_html` and
    writes it (UTF-8), creating folders as needed; an existing page for the run is replaced.

    Args:
        run_id: the run, also the report's folder name.
        metrics: the flattened ``evaluate.*`` figures.

    Returns:
        The path of the written ``index.html``.

    Raises:
        ImportError: if matplotlib, scikit-learn or Pillow is missing (the ``report`` extra).
    """
    started = time.perf_counter()
    e = cfg.evaluate
    vectors, labels, strips = collect_inputs(spark, cfg, e.tsne_sample, e.strips, e.seed)
    collected = time.perf_counter()
    tsne_png = None
    if vectors.shape[0] >= MIN_TSNE_POINTS:
        tsne_png = tsne_map(vectors, labels, seed=e.seed)
        logger.info(
            "report t-SNE: %s vectors of %s dims, %.1f s", f"{vectors.shape[0]:,}", vectors.shape[1],
            time.perf_counter() - collected,
        )
    else:
        logger.info("report t-SNE skipped: %d fused vectors in the sample", vectors.shape[0])
    page = render_html(run_id, metrics, tsne_png, strips)
    path = Path(e.report_dir) / run_id / "index.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    logger.info(
        "report: %s (%s KiB, %d strips, inputs %.1f s, total %.1f s)", path, f"{len(page.encode()) // 1024:,}",
        len(strips), collected - started, time.perf_counter() - started,
    )
    return path
