"""Embed stage: text and image (pandas UDFs), metadata (one-hot, :mod:`recsys.encoders.metadata`) and the fused vector
(:mod:`recsys.fusion`). All vectors go to ``item_embeddings`` (article_id, modality, model_id),
L2-normalised float32.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import pandas as pd
from delta.tables import DeltaTable
from pyspark.sql import DataFrame, Row, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.functions import pandas_udf
from pyspark.sql.types import ArrayType, FloatType, StringType

from recsys import tables
from recsys.config import Config
from recsys.encoders.image import model_id as image_model_id
from recsys.encoders.metadata import Vocabulary
from recsys.encoders.text import model_id as text_model_id
from recsys.encoders.text import resolve_model_path
from recsys.fusion import current_model_ids, current_vectors, fuse_vectors, modality_dims, plan_layout, save_layout
from recsys.inference import ImageEmbedderSpec, TextEmbedderSpec, make_image_embedder, make_text_embedder
from recsys.session import sql_conf
from recsys.sources.images import image_files, image_scans
from recsys.sources.schema import TEMPLATE_FIELDS, render_text
from recsys.training import resolve_image_weights

logger = logging.getLogger(__name__)

ARROW_BATCH = "spark.sql.execution.arrow.maxRecordsPerBatch"


def torch_threads(spark: SparkSession, configured: int) -> int:
    """Torch threads per Python worker: ``configured``, or ``spark.task.cpus`` (cores ÷ tasks)."""
    if configured > 0:
        return configured
    return max(1, int(spark.conf.get("spark.task.cpus", "1") or 1))


def article_texts(articles: DataFrame, template: str) -> DataFrame:
    """``(article_id, text, content_hash)``: the article text from ``template``, and its sha256."""

    @pandas_udf(StringType())  # type: ignore[call-overload]
    def render(fields: pd.DataFrame) -> pd.Series:
        records = fields.to_dict("records")
        return pd.Series([render_text(template, r) for r in records])

    struct = F.struct(*[F.col(name) for name in TEMPLATE_FIELDS])
    return articles.select("article_id", render(struct).alias("text")).withColumn(
        "content_hash", F.sha2("text", 256)
    )


def embed_text(spark: SparkSession, cfg: Config, run_id: str) -> dict[str, Any]:
    """Embed the text of every article whose text or model changed since it was last embedded,
    and delete the text vectors of articles no longer in ``articles``.

    Returns:
        ``{model_id, articles, embedded, skipped, stale_removed, seconds, texts_per_s}``.
    """
    db = cfg.data.database
    path = resolve_model_path(cfg.text.model)
    mid = text_model_id(path, cfg.text.max_length)
    articles = tables.read(spark, db, tables.ARTICLES)
    texts = article_texts(articles, cfg.text.template)
    existing = (
        tables.read(spark, db, tables.ITEM_EMBEDDINGS)
        .where((F.col("modality") == "text") & (F.col("model_id") == mid))
        .select("article_id", F.col("content_hash").alias("done_hash"))
    )
    todo = (
        texts.join(existing, "article_id", "left")
        .where(F.col("done_hash").isNull() | (F.col("done_hash") != F.col("content_hash")))
        .drop("done_hash")
        .persist()
    )
    n_todo = todo.count()
    n_all = articles.count()
    spec = TextEmbedderSpec(
        model_path=path,
        batch_size=cfg.text.batch_size,
        max_length=cfg.text.max_length,
        torch_threads=torch_threads(spark, cfg.text.torch_threads),
    )
    started = time.perf_counter()
    if n_todo:
        # a multiple of the task slots, so no round of tasks leaves cores idle; about 5,000
        # texts per task keeps the tail short
        slots = spark.sparkContext.defaultParallelism
        partitions = slots * max(1, -(-n_todo // (5_000 * slots)))
        embedder = make_text_embedder(spec)
        vectors = (
            todo.repartition(partitions, "article_id")
            .sortWithinPartitions(F.length("text"))
            .select(
                "article_id",
                F.lit("text").alias("modality"),
                F.lit(mid).alias("model_id"),
                embedder("text").alias("vector"),
                "content_hash",
                F.lit(run_id).alias("run_id"),
            )
            .withColumn("dim", F.size("vector"))
        )
        with sql_conf(spark, {ARROW_BATCH: str(cfg.text.arrow_batch_size)}):
            tables.merge(spark, db, tables.ITEM_EMBEDDINGS, vectors, within="t.modality = 'text'")
    seconds = time.perf_counter() - started
    todo.unpersist()
    n_stale = tables.delete_removed_vectors(spark, db, "text")
    rate = n_todo / seconds if n_todo and seconds > 0 else 0.0
    logger.info(
        "embed text: %d articles, %d embedded, %d unchanged, %.1f s, %.1f texts/s (model %s)",
        n_all, n_todo, n_all - n_todo, seconds, rate, mid,
    )
    return {
        "model_id": mid,
        "articles": n_all,
        "embedded": n_todo,
        "skipped": n_all - n_todo,
        "stale_removed": n_stale,
        "seconds": round(seconds, 2),
        "texts_per_s": round(rate, 2),
    }



def embed_image(spark: SparkSession, cfg: Config, run_id: str, weights: str) -> dict[str, Any]:
    """Embed the image of every article whose image file or model changed since it was embedded.

    The bytes come through ``binaryFile`` (local disk, HDFS or an object store), joined to
    ``articles.image_path``; an image's ``content_hash`` is the sha256 of its path, length and
    modification time, so unchanged files are not read again. Decoding and resizing happen in the
    pandas UDF. A file that cannot be used (zero bytes, not an image, truncated, over
    ``image.max_pixels``) goes to ``quarantine`` with its path and reason, and its article keeps
    its other modalities. Image vectors of articles whose image is gone or now unreadable are
    deleted, so no stale vector is served.

    Args:
        weights: ``image.weights`` resolved (``trained`` replaced by the checkpoint path).

    Returns:
        ``{model_id, articles_with_image, missing_files, embedded, skipped, quarantined,
        stale_removed, seconds, images_per_s}``; ``missing_files`` counts articles whose
        ``image_path`` names a file that no longer exists.
    """
    with image_scans(spark):
        return _embed_image(spark, cfg, run_id, weights)


def _embed_image(spark: SparkSession, cfg: Config, run_id: str, weights: str) -> dict[str, Any]:
    db = cfg.data.database
    mid = image_model_id(cfg.image.arch, weights, cfg.image.height, cfg.image.width, cfg.image.seed)
    started = time.perf_counter()
    with_path = tables.read(spark, db, tables.ARTICLES).where(F.col("image_path").isNotNull()).select(
        "article_id", "image_path"
    )
    meta = image_files(spark, with_path)
    candidates = with_path.join(meta, "image_path", "left").withColumn(
        "content_hash",
        F.when(
            F.col("length").isNotNull(),
            F.sha2(F.concat_ws("|", "image_path", "length", F.col("modification_time").cast("string"), F.lit(mid)), 256),
        ),
    ).persist()
    existing = (
        tables.read(spark, db, tables.ITEM_EMBEDDINGS)
        .where((F.col("modality") == "image") & (F.col("model_id") == mid))
        .select("article_id", F.col("content_hash").alias("done_hash"))
    )
    todo = (
        candidates.where(F.col("content_hash").isNotNull())
        .join(existing, "article_id", "left")
        .where(F.col("done_hash").isNull() | (F.col("done_hash") != F.col("content_hash")))
        .select("article_id", "image_path", "content_hash")
    ).persist()
    counts = tables.first_row(
        candidates.agg(F.count(F.lit(1)).alias("n"), F.sum(F.col("length").isNull().cast("int")).alias("missing"))
    )
    n_with_path, n_missing = int(counts["n"]), int(counts["missing"] or 0)
    n_todo = todo.count()
    quarantined = 0
    if n_todo:
        if weights != "none" and not weights.startswith("torchvision:") and "://" not in weights:
            try:  # executors that cannot read the driver's path get a copy (SparkFiles)
                spark.sparkContext.addFile(weights)
            except Exception as err:  # e.g. another file of the same name was added in this session
                logger.warning("could not ship %s with addFile (%s); executors read it from its path", weights, err)
        spec = ImageEmbedderSpec(
            arch=cfg.image.arch, weights=weights, height=cfg.image.height, width=cfg.image.width,
            batch_size=cfg.image.batch_size, torch_threads=torch_threads(spark, cfg.image.torch_threads),
            max_pixels=cfg.image.max_pixels, seed=cfg.image.seed,
        )
        slots = spark.sparkContext.defaultParallelism
        partitions = slots * max(1, -(-n_todo // (2_000 * slots)))
        blobs = image_files(spark, todo.select("image_path"), content=True).select("image_path", "content")
        results = (
            todo.join(blobs, "image_path")
            .repartition(partitions, "article_id")
            .select("article_id", "image_path", "content_hash", make_image_embedder(spec)("content").alias("r"))
            .persist()
        )
        with sql_conf(spark, {ARROW_BATCH: str(cfg.image.arrow_batch_size)}):
            results.count()  # the UDF runs once; both writes below read the cached result
        vectors = results.where(F.col("r.error").isNull()).select(
            "article_id",
            F.lit("image").alias("modality"),
            F.lit(mid).alias("model_id"),
            F.col("r.vector").alias("vector"),
            F.size("r.vector").alias("dim"),
            "content_hash",
            F.lit(run_id).alias("run_id"),
        )
        rejects = results.where(F.col("r.error").isNotNull()).select(
            F.lit(run_id).alias("run_id"),
            F.col("image_path").alias("source"),
            F.lit(0).cast("long").alias("row"),
            F.concat(F.lit("article_id="), F.col("article_id")).alias("record"),
            F.concat(F.lit("image: "), F.col("r.error")).alias("reason"),
            F.lit("embed").alias("stage"),
            F.current_timestamp().alias("quarantined_at"),
        )
        quarantined = rejects.count()
        if quarantined < n_todo:  # no commit when every image of the day was unusable
            tables.merge(spark, db, tables.ITEM_EMBEDDINGS, vectors, within="t.modality = 'image'")
        if quarantined:
            tables.merge(spark, db, tables.QUARANTINE, rejects, insert_only=True)
            for r in rejects.limit(5).collect():
                logger.warning("image quarantined: %s (%s)", r["source"], r["reason"])
        bad = results.where(F.col("r.error").isNotNull()).select("article_id")
    else:
        results = None
        bad = spark.createDataFrame([], "article_id string")
    # stale image vectors: the image was removed, its file is gone, or it is now unreadable
    usable = candidates.where(F.col("content_hash").isNotNull()).select("article_id").join(bad, "article_id", "left_anti")
    stale = (
        tables.read(spark, db, tables.ITEM_EMBEDDINGS)
        .where(F.col("modality") == "image")
        .select("article_id")
        .join(usable, "article_id", "left_anti")
        .distinct()
        .persist()
    )
    n_stale = stale.count()
    if n_stale:
        target = DeltaTable.forName(spark, tables.qualified(db, tables.ITEM_EMBEDDINGS))
        target.alias("t").merge(
            stale.alias("s"), "t.modality = 'image' AND t.article_id = s.article_id"
        ).whenMatchedDelete().execute()
    stale.unpersist()
    # one image model is served: vectors of an earlier model leave with its configuration (looked
    # for first: a DELETE that finds nothing still costs ~1.4 s on 2 cores, a one-row read less)
    other_model = (F.col("modality") == "image") & (F.col("model_id") != mid)
    if tables.read(spark, db, tables.ITEM_EMBEDDINGS).where(other_model).limit(1).count():
        DeltaTable.forName(spark, tables.qualified(db, tables.ITEM_EMBEDDINGS)).delete(other_model)
    if results is not None:
        results.unpersist()
    seconds = time.perf_counter() - started
    todo.unpersist()
    candidates.unpersist()
    embedded = n_todo - quarantined
    rate = n_todo / seconds if n_todo and seconds > 0 else 0.0
    logger.info(
        "embed image: %d articles with an image path (%d files missing), %d embedded, %d quarantined, "
        "%d unchanged, %d stale removed, %.1f s, %.1f images/s (model %s)",
        n_with_path, n_missing, embedded, quarantined, n_with_path - n_missing - n_todo, n_stale, seconds,
        rate, mid,
    )
    return {
        "model_id": mid,
        "articles_with_image": n_with_path,
        "missing_files": n_missing,
        "embedded": embedded,
        "quarantined": quarantined,
        "skipped": n_with_path - n_missing - n_todo,
        "stale_removed": n_stale,
        "seconds": round(seconds, 2),
        "images_per_s": round(rate, 2),
    }


def write_changed(spark: SparkSession, db: str, modality: str, mid: str, hashed: DataFrame,
                  rows_for: Callable[[DataFrame], DataFrame]) -> tuple[int, int]:
    """Write the vectors of ``modality`` whose ``content_hash`` changed, in one MERGE.

    ``hashed`` holds every current article of the modality (``article_id, content_hash`` and what
    ``rows_for`` needs); the articles whose hash is not stored under ``mid`` go to ``rows_for``
    (→ ``item_embeddings`` rows), and the stored vectors of this modality that are not
    ``(current article, mid)`` are deleted in the same commit. No commit when nothing changed.

    Returns:
        ``(written, deleted)`` counts.
    """
    stored = tables.read(spark, db, tables.ITEM_EMBEDDINGS).where(F.col("modality") == modality)
    todo = hashed.join(stored.where(F.col("model_id") == mid).select("article_id", "content_hash"),
                       ["article_id", "content_hash"], "left_anti").persist()
    deleted = (stored.select("article_id", "modality", "model_id")
               .join(hashed.select("article_id", F.lit(mid).alias("model_id")), ["article_id", "model_id"], "left_anti")
               .persist())
    try:
        n_todo, n_deleted = todo.count(), deleted.count()
        if n_todo or n_deleted:
            # every todo row has another content_hash than its stored row: each update changes the
            # row, so no comparison of the stored vectors (which would read them all back)
            tables.merge(spark, db, tables.ITEM_EMBEDDINGS, rows_for(todo), deleted=deleted,
                         within=f"t.modality = {tables.sql_string(modality)}")
        return n_todo, n_deleted
    finally:
        todo.unpersist()
        deleted.unpersist()


def _metadata_frame(articles: DataFrame, cfg: Config) -> tuple[DataFrame, list[str]]:
    columns = [*cfg.metadata.columns, *(f"attr_{a}" for a in cfg.metadata.attributes)]
    frame = articles.select(
        "article_id",
        *[F.col(c) for c in cfg.metadata.columns],
        *[F.col("attributes").getItem(a).alias(f"attr_{a}") for a in cfg.metadata.attributes],
    )
    return frame, columns


def load_vocabulary(spark: SparkSession, database: str, columns: tuple[str, ...],
                    weights: dict[str, float]) -> tuple[Vocabulary, Row] | None:
    """The newest metadata vocabulary in ``models`` for these columns and weights, with its row
    (None when there is none: the first run, or the columns or weights changed)."""
    rows = tables.read(spark, database, tables.MODELS).where("modality = 'metadata'").orderBy(
        F.col("created_at").desc()).collect()
    for row in rows:
        try:
            vocabulary = Vocabulary.from_json(row["recipe"])
        except ValueError:
            continue  # written by an older recsys (labels refitted each run): not extendable
        if vocabulary.matches(columns, weights):
            return vocabulary, row
    return None


def embed_metadata(spark: SparkSession, cfg: Config, run_id: str) -> dict[str, Any]:
    """One-hot encode the categorical attributes into one unit vector per article.

    The encoding is :class:`recsys.encoders.metadata.Vocabulary`: each column's labels keep their
    slot from run to run and new labels take spare slots, so the cosine of two articles is the
    weighted share of columns they agree on, and a new category value neither moves other
    articles' vectors nor changes the ``model_id`` (the saved LSH index stays valid). The
    vocabulary is stored in ``models`` (one row per ``model_id``, its labels appended in place);
    a column that outgrows its slots starts a new vocabulary and model. Only articles whose
    ``content_hash`` (the model and the attribute values) is not stored are encoded; one MERGE
    writes them and deletes the vectors of removed articles and of other vocabularies.

    Returns:
        ``{model_id, articles, encoded, deleted, dim, labels_added, new_vocabulary, seconds}``.
    """
    db = cfg.data.database
    started = time.perf_counter()
    frame, columns = _metadata_frame(tables.read(spark, db, tables.ARTICLES), cfg)
    weights = {c: float(cfg.metadata.column_weights.get(c, 1.0)) for c in columns}
    seen_row = tables.first_row(frame.select(*[F.collect_set(c).alias(c) for c in columns]))
    seen = {c: set(seen_row[c]) for c in columns}
    loaded = load_vocabulary(spark, db, tuple(columns), weights)
    extended = loaded[0].extended(seen) if loaded else None
    grew = loaded is not None and extended is not None and extended is not loaded[0]  # labels appended
    vocabulary = extended or Vocabulary.new(tuple(columns), weights, seen)
    if extended is None or grew:  # record it; a grown vocabulary keeps its first run and time
        first_run, created = ((loaded[1]["run_id"], F.lit(loaded[1]["created_at"])) if loaded and grew
                              else (run_id, F.current_timestamp()))
        record = spark.createDataFrame(
            [(vocabulary.model_id, "metadata", vocabulary.to_json(), first_run)],
            "model_id string, modality string, recipe string, run_id string",
        ).withColumn("created_at", created)
        tables.merge(spark, db, tables.MODELS, record)
    added = sum(len(vocabulary.labels[c]) - len(loaded[0].labels[c]) for c in columns) if loaded and grew else 0
    mid, dim = vocabulary.model_id, vocabulary.dim

    @pandas_udf(ArrayType(FloatType(), False))  # type: ignore[call-overload]
    def encode(values: pd.DataFrame) -> pd.Series:
        return pd.Series(list(vocabulary.encode(values)))

    # encode only the articles whose attributes (or model) changed: the hash says which
    hashed = frame.select("article_id", *columns, F.sha2(F.concat_ws("|", F.lit(mid), F.to_json(F.struct(*columns))),
                                                          256).alias("content_hash"))
    n_todo, n_deleted = write_changed(spark, db, "metadata", mid, hashed, lambda todo: todo.select(
        "article_id",
        F.lit("metadata").alias("modality"),
        F.lit(mid).alias("model_id"),
        encode(F.struct(*columns)).alias("vector"),
        F.lit(dim).alias("dim"),
        "content_hash",
        F.lit(run_id).alias("run_id"),
    ))
    seconds = time.perf_counter() - started
    n = tables.read(spark, db, tables.ITEM_EMBEDDINGS).where("modality = 'metadata'").count()
    logger.info("embed metadata: %d articles, %d encoded, %d deleted, dim %d, %d labels added, %.1f s (model %s%s)",
                n, n_todo, n_deleted, dim, added, seconds, mid, ", new vocabulary" if extended is None else "")
    return {"model_id": mid, "articles": n, "encoded": n_todo, "deleted": n_deleted, "dim": dim,
            "labels_added": added, "new_vocabulary": extended is None, "seconds": round(seconds, 2)}


def fuse(spark: SparkSession, cfg: Config, run_id: str, model_ids: dict[str, str]) -> dict[str, Any]:
    """Fuse each article's modality vectors (:func:`fuse_vectors`) into ``modality='fused'``.

    Only the articles whose parts changed are fused: a fused vector's ``content_hash`` is the
    SHA-256 of its layout's ``model_id`` and its parts' ``(modality, content_hash)``, so an
    article whose hash is stored under the current layout is left as it is, without reading its
    vectors. One MERGE writes the new fused vectors and deletes those of articles that have no
    part any more or were fused with another layout (a changed layout fuses every article).

    Args:
        model_ids: the model per modality to fuse (modalities with weight 0 are left out).

    Returns:
        ``{model_id, articles, dim, segments, fused, deleted, seconds}``; ``segments`` gives
        each modality's ``[start, end)`` slice of the fused vector, from which per-modality
        cosines are recovered; ``fused`` and ``deleted`` count the vectors written and removed.

    Raises:
        ValueError: if no modality with a positive weight has vectors.
    """
    started = time.perf_counter()
    db = cfg.data.database
    weights = {m: w for m, w in cfg.fusion.weights.items() if w > 0 and m in model_ids}
    if not weights:
        raise ValueError(f"fusion: none of the weighted modalities {sorted(cfg.fusion.weights)} has vectors")
    used = {m: model_ids[m] for m in weights}
    vectors = current_vectors(spark, cfg, used)
    layout = plan_layout(weights, model_ids, modality_dims(vectors))
    mid = save_layout(spark, db, layout, run_id)
    in_layout = F.lit(False)
    for modality, part_model in used.items():
        in_layout = in_layout | ((F.col("modality") == modality) & (F.col("model_id") == part_model))
    part = F.concat_ws(":", "modality", F.coalesce("content_hash", F.lit("")))
    hashes = (
        tables.read(spark, db, tables.ITEM_EMBEDDINGS).where(in_layout)
        .join(tables.read(spark, db, tables.ARTICLES).select("article_id"), "article_id", "left_semi")
        .groupBy("article_id")
        .agg(F.sha2(F.concat_ws("|", F.lit(mid), F.array_join(F.array_sort(F.collect_list(part)), "|")), 256)
             .alias("content_hash"))
    )
    n_todo, n_deleted = write_changed(spark, db, "fused", mid, hashes, lambda todo: fuse_vectors(
        vectors.join(todo.select("article_id"), "article_id", "left_semi"), layout).join(todo, "article_id").select(
        "article_id",
        F.lit("fused").alias("modality"),
        F.lit(mid).alias("model_id"),
        "vector",
        "dim",
        "content_hash",
        F.lit(run_id).alias("run_id"),
    ))
    n = tables.read(spark, db, tables.ITEM_EMBEDDINGS).where("modality = 'fused'").count()
    seconds = time.perf_counter() - started
    logger.info("fuse %s: %d articles, %d fused, %d deleted, dim %d, %.1f s",
                "+".join(m for m, _, _ in layout.segments), n, n_todo, n_deleted, layout.dim, seconds)
    segments = {m: (lo, hi) for m, lo, hi in layout.segments}
    return {"model_id": mid, "articles": n, "dim": layout.dim, "segments": segments, "fused": n_todo,
            "deleted": n_deleted, "seconds": round(seconds, 2)}


def run(spark: SparkSession, cfg: Config, run_id: str) -> dict[str, Any]:
    """Embed stage: text and image (incremental), metadata, then the fused vector.

    Returns:
        Per modality its report (``model_id``, counts, seconds), and ``fused``.

    Raises:
        FileNotFoundError: ``image.weights`` is ``trained``, articles have images, and no
            checkpoint was trained (the train stage is off or has not run).
    """
    report: dict[str, Any] = {}
    model_ids: dict[str, str] = {}
    if cfg.text.enabled:
        report["text"] = embed_text(spark, cfg, run_id)
        model_ids["text"] = report["text"]["model_id"]
    if cfg.image.enabled:
        has_images = bool(
            tables.read(spark, cfg.data.database, tables.ARTICLES).where(F.col("image_path").isNotNull()).limit(1).count()
        )
        if has_images:
            report["image"] = embed_image(spark, cfg, run_id, resolve_image_weights(cfg))
            model_ids["image"] = report["image"]["model_id"]
        else:
            logger.info("embed image: no article has an image, skipped")
    if cfg.metadata.enabled:
        report["metadata"] = embed_metadata(spark, cfg, run_id)
        model_ids["metadata"] = report["metadata"]["model_id"]
    for modality, mid in current_model_ids(spark, cfg).items():
        if modality == "behaviour" and cfg.behaviour.enabled:
            model_ids.setdefault(modality, mid)
    report["fused"] = fuse(spark, cfg, run_id, model_ids)
    return report
