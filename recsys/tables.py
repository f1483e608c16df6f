"""Every Delta table recsys writes: name, schema, key, partitioning and comments, in one place.

Writers go through :func:`merge` (upsert on the table's key) or :func:`replace` (overwrite the
rows a predicate selects, in one Delta commit), so readers always see a complete version.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from delta.tables import DeltaTable
from pyspark.sql import Column, DataFrame, Row, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import (
    ArrayType,
    BinaryType,
    DateType,
    DoubleType,
    FloatType,
    IntegerType,
    LongType,
    MapType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

logger = logging.getLogger(__name__)

CHANGE_FEED = "delta.enableChangeDataFeed"
DELETION_VECTORS = "delta.enableDeletionVectors"


@dataclass(frozen=True)
class TableSpec:
    """One Delta table: ``name`` within the database, its schema, key and partition columns."""

    name: str
    schema: StructType
    key: tuple[str, ...]
    partition_by: tuple[str, ...] = ()
    comment: str = ""
    change_feed: bool = False  # Delta's change data feed on: readers ask what changed since a version
    # Delta's deletion vectors on: a MERGE that changes a few rows of a large file marks them
    # deleted in a small side file and writes only the new rows, instead of rewriting the file
    deletion_vectors: bool = False

    def properties(self) -> dict[str, str]:
        """The Delta table properties this table is created with and kept at."""
        wanted = {CHANGE_FEED: self.change_feed, DELETION_VECTORS: self.deletion_vectors}
        return {name: "true" for name, on in wanted.items() if on}


def _f(name: str, dtype: object, comment: str, nullable: bool = True) -> StructField:
    return StructField(name, dtype, nullable, metadata={"comment": comment})  # type: ignore[arg-type]


S, TS = StringType(), TimestampType()

ARTICLES = TableSpec(
    "articles",
    StructType(
        [
            _f("article_id", S, "article key (H&M: 10-digit zero-padded string)", False),
            _f("product_group_id", S, "product shared by colour/size variants"),
            _f("name", S, "display name"),
            _f("description", S, "free-text description, may be empty"),
            _f("category_l1", S, "broadest category level"),
            _f("category_l2", S, "middle category level"),
            _f("category_l3", S, "finest category level: the product type"),
            _f("colour", S, "colour name"),
            _f("attributes", MapType(S, S), "every other source attribute"),
            _f("image_path", S, "image path or URI; null when the article has no image"),
            _f("source", S, "source adapter and file the row came from"),
            _f("content_hash", S, "sha256 of the canonical fields; changes when the article does"),
            _f("ingested_at", TS, "when this version of the row was written"),
            _f("run_id", S, "run that wrote this version"),
        ]
    ),
    key=("article_id",),
    comment="The catalogue as ingested, in the canonical schema.",
)

CUSTOMERS = TableSpec(
    "customers",
    StructType(
        [
            _f("customer_id", S, "customer key (H&M: 64 hex characters)", False),
            _f("fn", DoubleType(), "H&M FN flag (1.0 or null)"),
            _f("active", DoubleType(), "H&M Active flag (1.0 or null)"),
            _f("club_member_status", S, "ACTIVE, PRE-CREATE, LEFT CLUB or null"),
            _f("fashion_news_frequency", S, "NONE, Regularly, Monthly or null"),
            _f("age", IntegerType(), "age in years, null when unknown"),
            _f("postal_code", S, "hashed postal code"),
            _f("ingested_at", TS, "when this version of the row was written"),
            _f("run_id", S, "run that wrote this version"),
        ]
    ),
    key=("customer_id",),
    comment="Customers as ingested.",
)

TRANSACTIONS = TableSpec(
    "transactions",
    StructType(
        [
            _f("t_dat", DateType(), "purchase date", False),
            _f("customer_id", S, "buyer", False),
            _f("article_id", S, "article bought", False),
            _f("row_number", LongType(), "line in the source file (identical lines are separate units)", False),
            _f("price", DoubleType(), "price as given (H&M: scaled)"),
            _f("sales_channel_id", IntegerType(), "1 store, 2 online"),
            _f("run_id", S, "run that wrote this row"),
        ]
    ),
    key=("t_dat", "customer_id", "article_id", "row_number"),
    partition_by=("t_dat",),
    comment="Purchases as ingested, partitioned by date.",
)

QUARANTINE = TableSpec(
    "quarantine",
    StructType(
        [
            _f("run_id", S, "run that rejected the record", False),
            _f("source", S, "file (or table) the record came from", False),
            _f("row", LongType(), "record number in the file (1 = the header; the line number unless a record spans lines)", False),
            _f("record", S, "the raw record as read"),
            _f("reason", S, "why it was rejected"),
            _f("stage", S, "stage that rejected it: ingest, embed, ..."),
            _f("quarantined_at", TS, "when it was rejected"),
        ]
    ),
    key=("run_id", "source", "row"),
    comment="Rejected input records with the reason; input = accepted + quarantined.",
)

ITEM_EMBEDDINGS = TableSpec(
    "item_embeddings",
    StructType(
        [
            _f("article_id", S, "article key", False),
            _f("modality", S, "text, image, metadata, behaviour or fused", False),
            _f("model_id", S, "model (or encoder/fusion recipe) that produced the vector", False),
            _f("vector", ArrayType(FloatType(), False), "embedding, float32, L2-normalised"),
            _f("dim", IntegerType(), "length of vector"),
            _f("content_hash", S, "hash of the input the vector was computed from"),
            _f("run_id", S, "run that wrote this vector"),
        ]
    ),
    key=("article_id", "modality", "model_id"),
    partition_by=("modality",),
    comment="One L2-normalised vector per article, modality and model.",
    deletion_vectors=True,  # a daily refresh changes ~1% of the vectors: no rewrite of every vector file
)

ITEM_NEIGHBOURS = TableSpec(
    "item_neighbours",
    StructType(
        [
            _f("article_id", S, "query article", False),
            _f("modality", S, "vector space the neighbours were found in", False),
            _f("rank", IntegerType(), "1..K, no gaps", False),
            _f("neighbour_id", S, "neighbouring article (never the query itself)", False),
            _f("score", FloatType(), "cosine similarity"),
            _f("modality_scores", MapType(S, FloatType()), "fused only: the cosine in each modality"),
            _f("run_id", S, "run that wrote this row"),
        ]
    ),
    key=("article_id", "modality", "rank"),
    partition_by=("modality",),
    comment="Top-K nearest neighbours per article and modality (score desc, then id asc).",
    change_feed=True,
)

ITEM_RECOMMENDATIONS = TableSpec(
    "item_recommendations",
    StructType(
        [
            _f("article_id", S, "query article", False),
            _f("rank", IntegerType(), "1..K, no gaps", False),
            _f("recommended_id", S, "recommended article", False),
            _f("score", FloatType(), "fused cosine similarity"),
            _f("modality_scores", MapType(S, FloatType()), "cosine per modality (absent: no vector)"),
            _f("run_id", S, "run that wrote this row"),
        ]
    ),
    key=("article_id", "rank"),
    comment="The served similar-items list per article.",
)

CUSTOMER_RECOMMENDATIONS = TableSpec(
    "customer_recommendations",
    StructType(
        [
            _f("customer_id", S, "customer", False),
            _f("rank", IntegerType(), "1..12", False),
            _f("article_id", S, "recommended article", False),
            _f("score", FloatType(), "ranking score"),
            _f("reason", S, "similar_to:<article_id>, repurchase or popular"),
            _f("run_id", S, "run that wrote this row"),
        ]
    ),
    key=("customer_id", "rank"),
    comment="Top-12 per customer (H&M competition format).",
)

RUNS = TableSpec(
    "runs",
    StructType(
        [
            _f("run_id", S, "run key", False),
            _f("started_at", TS, "start time"),
            _f("ended_at", TS, "end time"),
            _f("status", S, "succeeded or failed"),
            _f("stages", S, "the stages run, in order"),
            _f("config", S, "the validated configuration, JSON"),
            _f("report", S, "the run report, JSON: counts and seconds per stage"),
        ]
    ),
    key=("run_id",),
    comment="What each run did.",
)

METRICS = TableSpec(
    "metrics",
    StructType(
        [
            _f("run_id", S, "run key", False),
            _f("name", S, "metric name, e.g. knn.fused.recall_at_k", False),
            _f("value", DoubleType(), "the figure"),
            _f("stage", S, "stage that measured it"),
            _f("detail", S, "how it was measured"),
            _f("recorded_at", TS, "when it was measured"),
        ]
    ),
    key=("run_id", "name"),
    comment="Counts, timings and quality figures per run.",
)

LSH_INDEX = TableSpec(
    "lsh_index",
    StructType(
        [
            _f("modality", S, "vector space the index hashes", False),
            _f("index_id", S, "lsh@<sha256 of params and hash functions>: changes when the index is refitted", False),
            _f("model_id", S, "model of the vectors the index was fitted on"),
            _f("dim", IntegerType(), "vector length"),
            _f("params", S, "LSHParams and fitted sizes (bands, cells, groups, probes), JSON"),
            _f("hash_functions", BinaryType(), "numpy .npz: centroids per band or hyperplanes, and cell groups"),
            _f("articles", LongType(), "vectors the index was fitted on"),
            _f("fitted_at", TS, "when it was fitted"),
            _f("run_id", S, "run that fitted it"),
            _f("changed_since_fit", LongType(),
               "vectors new, changed or removed by the updates since the fit, summed over runs (the drift)"),
            _f("largest_bucket", LongType(), "members of the largest home bucket among the vectors it was fitted on"),
        ]
    ),
    key=("modality",),
    comment="The fitted LSH index per modality, reused by later runs until it is refitted.",
)

MODELS = TableSpec(
    "models",
    StructType(
        [
            _f("model_id", S, "model key, as written on item_embeddings", False),
            _f("modality", S, "modality the model embeds"),
            _f("recipe", S, "what the model is, JSON (fused: each modality's slice, model and weight)"),
            _f("created_at", TS, "when it was first recorded"),
            _f("run_id", S, "run that first recorded it"),
        ]
    ),
    key=("model_id",),
    comment="Models behind the vectors in item_embeddings; the fused vector's layout per fused model_id.",
)

STAGE_STATE = TableSpec(
    "stage_state",
    StructType(
        [
            _f("stage", S, "stage that consumed the input", False),
            _f("input", S, "input table (or settings) consumed", False),
            _f("version", LongType(), "Delta version of the input table the stage last consumed"),
            _f("fingerprint", S, "for settings: the SHA-256 of the settings the stage last ran with"),
            _f("run_id", S, "run that consumed it"),
            _f("recorded_at", TS, "when it was recorded"),
        ]
    ),
    key=("stage", "input"),
    comment="What each stage consumed when it last ran: the next run reads only what changed since.",
)

ALL_TABLES: tuple[TableSpec, ...] = (
    ARTICLES,
    CUSTOMERS,
    TRANSACTIONS,
    QUARANTINE,
    ITEM_EMBEDDINGS,
    ITEM_NEIGHBOURS,
    ITEM_RECOMMENDATIONS,
    CUSTOMER_RECOMMENDATIONS,
    RUNS,
    METRICS,
    LSH_INDEX,
    MODELS,
    STAGE_STATE,
)


def qualified(database: str, spec: TableSpec) -> str:
    """``database.table`` for ``spec``."""
    return f"{database}.{spec.name}"


def ensure_tables(spark: SparkSession, database: str) -> None:
    """Create the database and every table in :data:`ALL_TABLES` if missing.

    An existing table that lacks a column the current schema declares (a table written by an
    older recsys) gets it added, nullable, with ``ALTER TABLE ... ADD COLUMNS``; other
    differences are left for Delta to reject on write.
    """
    spark.sql(f"CREATE DATABASE IF NOT EXISTS {database}")
    # one catalog listing instead of a lookup per table
    existing = {r["tableName"] for r in spark.sql(f"SHOW TABLES IN {database}").collect() if not r["isTemporary"]}
    for spec in ALL_TABLES:
        name = qualified(database, spec)
        if spec.name in existing:
            present = {f.name for f in spark.table(name).schema.fields}
            missing = [f for f in spec.schema.fields if f.name not in present]
            if missing:
                columns = ", ".join(
                    f"`{f.name}` {f.dataType.simpleString()} COMMENT '{f.metadata.get('comment', '')}'" for f in missing
                )
                spark.sql(f"ALTER TABLE {name} ADD COLUMNS ({columns})")
                logger.info("table %s: added column(s) %s", name, [f.name for f in missing])
            wanted = spec.properties()
            if wanted:
                # the table's properties from its snapshot, without DESCRIBE DETAIL's Spark job
                have: dict[str, str] = dict(spark.sql(f"SHOW TBLPROPERTIES {name}").collect())
                missing_properties = {k: v for k, v in wanted.items() if have.get(k) != v}
                if missing_properties:
                    settings = ", ".join(f"'{k}' = '{v}'" for k, v in missing_properties.items())
                    spark.sql(f"ALTER TABLE {name} SET TBLPROPERTIES ({settings})")
                    logger.info("table %s: set %s", name, settings)
            continue
        builder = (
            DeltaTable.createIfNotExists(spark)
            .tableName(qualified(database, spec))
            .addColumns(spec.schema)
            .comment(spec.comment)
        )
        for key, value in spec.properties().items():
            builder = builder.property(key, value)
        if spec.partition_by:
            builder = builder.partitionedBy(*spec.partition_by)
        builder.execute()


def conform(df: DataFrame, spec: TableSpec) -> DataFrame:
    """Select and cast ``df``'s columns to ``spec``'s schema, in order.

    Raises:
        ValueError: if ``df`` lacks a column of the table, naming the table and column.
    """
    missing = [f.name for f in spec.schema.fields if f.name not in df.columns]
    if missing:
        raise ValueError(f"table {spec.name}: input lacks column(s) {missing}")
    return df.select([F.col(f.name).cast(f.dataType).alias(f.name) for f in spec.schema.fields])


# Columns that record when and by which run a row was written, not what it says.
BOOKKEEPING = frozenset({"run_id", "ingested_at", "quarantined_at", "recorded_at"})


def merge(
    spark: SparkSession,
    database: str,
    spec: TableSpec,
    df: DataFrame,
    insert_only: bool = False,
    only_changed: bool = False,
    delete_missing: str | None = None,
    deleted: DataFrame | None = None,
    within: str | None = None,
) -> None:
    """Upsert ``df`` into the table on its key, in one Delta commit.

    Rows whose key exists are updated in full; with ``only_changed`` only when a data column
    differs (so a rerun on the same input leaves the row, its ``run_id`` and timestamps as
    they were); with ``insert_only`` never. New keys are inserted. Nothing is deleted unless
    ``delete_missing`` is given: then the table's rows that match that SQL predicate (columns
    qualified with ``t.``) and whose key is not in ``df`` are deleted in the same commit, so
    ``df`` becomes the whole of that slice. ``deleted`` (the key columns) lists rows to delete
    in the same commit, without a scan of the slice: keys that ``df`` does not hold. ``df``
    must hold each key at most once (Delta raises otherwise). ``within`` (SQL on ``t.``, e.g. one
    partition) is a predicate every row of ``df`` and ``deleted`` satisfies: it joins the merge
    condition, so Delta reads only the target files that can match (partition pruning).

    Raises:
        ValueError: ``within`` with ``delete_missing`` (rows outside ``within`` would count as
            missing from ``df``).
    """
    if within is not None and delete_missing is not None:
        raise ValueError("merge: within and delete_missing together would delete the rows outside within")
    target = DeltaTable.forName(spark, qualified(database, spec))
    condition = " AND ".join(f"t.`{k}` = s.`{k}`" for k in spec.key)
    if within is not None:
        condition = f"({within}) AND {condition}"
    source = conform(df, spec)
    if deleted is not None:
        gone = deleted.select(*spec.key).join(source.select(*spec.key), list(spec.key), "left_anti")
        blanks = [F.lit(None).cast(f.dataType).alias(f.name) for f in spec.schema.fields if f.name not in spec.key]
        source = source.withColumn("_delete", F.lit(False)).unionByName(
            gone.select(*spec.key, *blanks, F.lit(True).alias("_delete")))
    builder = target.alias("t").merge(source.alias("s"), condition)
    columns: dict[str, str | Column] = {f"`{f.name}`": f"s.`{f.name}`" for f in spec.schema.fields}
    if deleted is not None:
        builder = builder.whenMatchedDelete(condition="s._delete")
    if not insert_only:
        data = [f for f in spec.schema.fields if f.name not in spec.key and f.name not in BOOKKEEPING]
        changed = " OR ".join(_differs(f) for f in data) if only_changed and data else None
        builder = builder.whenMatchedUpdate(condition=changed, set=columns)
    if deleted is not None:
        builder = builder.whenNotMatchedInsert(condition="NOT s._delete", values=columns)
    else:
        builder = builder.whenNotMatchedInsert(values=columns)
    if delete_missing is not None:
        builder = builder.whenNotMatchedBySourceDelete(condition=delete_missing)
    builder.execute()


def _differs(field: StructField) -> str:
    """SQL: the column differs between ``t`` and ``s`` (null-safe; a map compared as its sorted
    entries, since maps have no equality in Spark SQL)."""
    if isinstance(field.dataType, MapType):
        return f"NOT (array_sort(map_entries(t.`{field.name}`)) <=> array_sort(map_entries(s.`{field.name}`)))"
    return f"NOT (t.`{field.name}` <=> s.`{field.name}`)"


def delete_removed_vectors(spark: SparkSession, database: str, modality: str) -> int:
    """Delete ``modality``'s rows of ``item_embeddings`` whose article is no longer in
    ``articles`` (one commit; none when there are none).

    Returns:
        How many articles lost their vectors.
    """
    stale = (
        read(spark, database, ITEM_EMBEDDINGS).where(F.col("modality") == modality).select("article_id")
        .join(read(spark, database, ARTICLES).select("article_id"), "article_id", "left_anti").distinct().persist()
    )
    n = stale.count()
    if n:
        DeltaTable.forName(spark, qualified(database, ITEM_EMBEDDINGS)).alias("t").merge(
            stale.alias("s"), f"t.modality = {sql_string(modality)} AND t.article_id = s.article_id"
        ).whenMatchedDelete().execute()
    stale.unpersist()
    return n


def sql_string(value: str) -> str:
    """``value`` as a quoted Spark SQL string literal (quotes and backslashes escaped)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def replace(spark: SparkSession, database: str, spec: TableSpec, df: DataFrame, where: str) -> None:
    """Replace the rows matching the SQL predicate ``where`` with ``df``, in one Delta commit.

    Every row of ``df`` must satisfy ``where`` (Delta's ``replaceWhere`` checks it).
    """
    # Written by path: saveAsTable in overwrite mode would also rewrite the catalog entry.
    (
        conform(df, spec)
        .write.format("delta")
        .mode("overwrite")
        .option("replaceWhere", where)
        .save(location(spark, database, spec))
    )


def location(spark: SparkSession, database: str, spec: TableSpec) -> str:
    """The storage location of a table (its Delta log lives under it)."""
    return str(first_row(DeltaTable.forName(spark, qualified(database, spec)).detail())["location"])


def first_row(df: DataFrame) -> Row:
    """The first row of ``df`` (an aggregate's single row).

    Raises:
        ValueError: if ``df`` is empty.
    """
    row = df.first()
    if row is None:
        raise ValueError("expected a row, got an empty result")
    return row


def read(spark: SparkSession, database: str, spec: TableSpec) -> DataFrame:
    """The current version of a table."""
    return spark.table(qualified(database, spec))
