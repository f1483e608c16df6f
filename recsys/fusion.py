"""The fused vector: which modality occupies which slice of it, with which weight, and the
current vectors per modality it is built from.

Fusion (weighted concatenation): for the modalities m an article has, with config weights w_m,
``fused = concat(sqrt(w_m) * v_m) / sqrt(sum w_m)``. Each part is unit length, so the result is
unit length, and for two articles with the same modalities ``cos(fused) = sum w_m cos_m / sum w_m``:
a weight is the modality's share of the fused similarity. An article missing a modality gets a
fused vector from the ones it has (its part is zeros and the weights re-normalise). The layout
(:class:`FusionLayout`) is decided once, when the fused vectors are written, and stored with
their ``model_id`` in ``models``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType, FloatType, IntegerType, StringType, StructField, StructType

from recsys import tables
from recsys.config import Config
from recsys.knn.params import Segments

logger = logging.getLogger(__name__)


def current_vectors(spark: SparkSession, cfg: Config, model_ids: dict[str, str]) -> DataFrame:
    """``(article_id, modality, vector)`` for the current articles and the given model per modality."""
    db = cfg.data.database
    condition = F.lit(False)
    for modality, mid in model_ids.items():
        condition = condition | ((F.col("modality") == modality) & (F.col("model_id") == mid))
    current = tables.read(spark, db, tables.ARTICLES).select("article_id")
    return (
        tables.read(spark, db, tables.ITEM_EMBEDDINGS)
        .where(condition)
        .join(current, "article_id", "left_semi")
        .select("article_id", "modality", "vector", "dim")
    )


@dataclass(frozen=True)
class FusionPart:
    """One modality's slice ``[start, end)`` of the fused vector, its model and its weight."""

    modality: str
    model_id: str
    weight: float
    start: int
    end: int


@dataclass(frozen=True)
class FusionLayout:
    """Which modality occupies which slice of the fused vector, with which weight: decided once
    (:func:`plan_layout`) when the fused vectors are written, stored in ``models`` under the
    fused ``model_id`` (:func:`save_layout`), and read back by whoever needs the slices
    (:func:`load_layout`), so writer and readers cannot disagree."""

    parts: tuple[FusionPart, ...]

    @property
    def dim(self) -> int:
        """Length of the fused vector."""
        return self.parts[-1].end if self.parts else 0

    @property
    def segments(self) -> Segments:
        """``(modality, start, end)`` per part, in order."""
        return tuple((p.modality, p.start, p.end) for p in self.parts)

    def to_json(self) -> str:
        """The layout as canonical JSON (sorted keys): what :attr:`model_id` hashes."""
        return json.dumps({"parts": [asdict(p) for p in self.parts]}, sort_keys=True)

    @property
    def model_id(self) -> str:
        """``fused@`` and the first 12 hex digits of the SHA-256 of :meth:`to_json`: the same
        modalities, models, weights and slices give the same id."""
        return "fused@" + hashlib.sha256(self.to_json().encode()).hexdigest()[:12]

    @classmethod
    def from_json(cls, text: str) -> FusionLayout:
        """The layout :meth:`to_json` wrote.

        Raises:
            ValueError: the text is not such a layout.
        """
        try:
            return cls(tuple(FusionPart(**part) for part in json.loads(text)["parts"]))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"fusion: not a fused-vector layout ({err}): {text[:200]!r}") from err


def modality_dims(vectors: DataFrame) -> dict[str, int]:
    """The vector length of each modality in ``(modality, dim)`` rows.

    Raises:
        ValueError: a modality has vectors of two lengths.
    """
    rows = vectors.groupBy("modality").agg(F.min("dim").alias("lo"), F.max("dim").alias("hi")).collect()
    for r in rows:
        if r["lo"] != r["hi"]:
            raise ValueError(f"fusion: modality {r['modality']} has vectors of dims {r['lo']}..{r['hi']}")
    return {r["modality"]: int(r["lo"]) for r in rows}


def plan_layout(weights: Mapping[str, float], model_ids: Mapping[str, str], dims: Mapping[str, int]) -> FusionLayout:
    """The fused vector's layout: the modalities with a positive weight, a model and vectors,
    in modality name order, each ``dims[m]`` long.

    Raises:
        ValueError: no such modality.
    """
    order = sorted(m for m, w in weights.items() if w > 0 and m in model_ids and m in dims)
    if not order:
        raise ValueError(
            f"fusion: no vectors for any weighted modality of {sorted(m for m, w in weights.items() if w > 0)}; "
            "run the embed stage first"
        )
    parts, start = [], 0
    for m in order:
        parts.append(FusionPart(m, model_ids[m], float(weights[m]), start, start + int(dims[m])))
        start += int(dims[m])
    return FusionLayout(tuple(parts))


def fuse_vectors(vectors: DataFrame, layout: FusionLayout) -> DataFrame:
    """Fuse each article's modality vectors into one (see the module docstring).

    The fused vector is the concatenation, in the layout's order, of ``sqrt(w_m) * v_m`` over
    the modalities the article has (zeros for the others), divided by ``sqrt(sum of those
    w_m)``: the cosine of two fused vectors is the weighted mean of the per-modality cosines
    when both have every modality.

    Args:
        vectors: ``(article_id, modality, vector array<float>, dim int)``, L2-normalised, one
            row per article and modality; modalities not in ``layout`` are ignored.
        layout: from :func:`plan_layout`.

    Returns:
        ``(article_id, vector array<float>, dim int)``, one row per article with at least one
        of the layout's modalities; ``dim`` is ``layout.dim``.

    Raises:
        ValueError: a vector's length differs from its slice (checked per batch, on the executors).
    """
    parts = layout.parts
    order = [p.modality for p in parts]
    total = layout.dim
    vectors = vectors.where(F.col("modality").isin(*order))
    pivot = vectors.groupBy("article_id").pivot("modality", list[object](order)).agg(F.first("vector"))  # type: ignore[arg-type]
    schema = StructType(
        [StructField("article_id", StringType()), StructField("vector", ArrayType(FloatType(), False)),
         StructField("dim", IntegerType())]
    )

    def combine(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for batch in batches:
            out = np.zeros((len(batch), total), dtype=np.float32)
            mass = np.zeros(len(batch), dtype=np.float32)
            for p in parts:
                w = np.float32(np.sqrt(p.weight))
                for i, v in enumerate(batch[p.modality]):
                    if v is not None:
                        if len(v) != p.end - p.start:
                            raise ValueError(f"fusion: article {batch['article_id'].iloc[i]} has a {p.modality} "
                                             f"vector of length {len(v)}, the layout expects {p.end - p.start}")
                        out[i, p.start : p.end] = w * np.asarray(v, dtype=np.float32)
                        mass[i] += p.weight
            out /= np.sqrt(np.maximum(mass, 1e-12))[:, None]
            yield pd.DataFrame({"article_id": batch["article_id"], "vector": list(out), "dim": total})

    return pivot.mapInPandas(combine, schema)  # type: ignore[arg-type]


def save_layout(spark: SparkSession, database: str, layout: FusionLayout, run_id: str) -> str:
    """Record ``layout`` in ``models`` under its ``model_id`` (a MERGE: an existing entry stays
    as first written); returns the model_id."""
    row = spark.createDataFrame(
        [(layout.model_id, "fused", layout.to_json(), run_id)], "model_id string, modality string, recipe string, run_id string"
    ).withColumn("created_at", F.current_timestamp())
    tables.merge(spark, database, tables.MODELS, row, insert_only=True)
    return layout.model_id


def load_layout(spark: SparkSession, database: str, model_id: str) -> FusionLayout:
    """The layout of the fused vectors with ``model_id``.

    Raises:
        LookupError: ``models`` has no entry for it (fused vectors written by an older recsys:
            run the embed stage again).
        ValueError: the entry is not a layout.
    """
    rows = tables.read(spark, database, tables.MODELS).where(F.col("model_id") == model_id).collect()
    if not rows:
        raise LookupError(f"fusion: {database}.models has no layout for fused model {model_id}; run the embed stage")
    return FusionLayout.from_json(rows[0]["recipe"])


def current_model_ids(spark: SparkSession, cfg: Config) -> dict[str, str]:
    """The model per modality this configuration serves.

    Text: derived from ``cfg.text`` (so a changed model is noticed). Metadata and fused: the one
    model id the table holds (those vectors are replaced whole each run).
    """
    ids: dict[str, str] = {}
    rows = (
        tables.read(spark, cfg.data.database, tables.ITEM_EMBEDDINGS)
        .where(F.col("modality").isin("metadata", "fused", "image", "behaviour"))
        .select("modality", "model_id")
        .distinct()
        .collect()
    )
    for row in rows:
        if row["modality"] == "behaviour" and not cfg.behaviour.enabled:
            continue
        ids[row["modality"]] = row["model_id"]
    if cfg.text.enabled:
        # imported here: recsys.encoders.text imports torch (5 s on 2 cores), and a Python worker
        # that unpickles fuse_vectors' FusionPart objects imports this module
        from recsys.encoders.text import model_id as text_model_id
        from recsys.encoders.text import resolve_model_path

        ids["text"] = text_model_id(resolve_model_path(cfg.text.model), cfg.text.max_length)
    return ids
