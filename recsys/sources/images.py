"""Product images through Spark's ``binaryFile`` source (local disk, HDFS or an object store)."""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from pathlib import Path

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StringType, StructField, StructType

from recsys.session import sql_conf

logger = logging.getLogger(__name__)

# Spark packs files into a scan task up to spark.sql.files.maxPartitionBytes, counting each file
# as at least spark.sql.files.openCostInBytes (default 4 MiB, sized for Parquet files): product
# images of ~10 KB then go 32 to a task, 449 tasks for H&M's 14k images, where a scan of their
# sizes and times (no bytes read) takes ~3 s of task scheduling on 2 cores. 64 KiB counts the
# opening of an image as a read of a few images: ~9 tasks for those 14k files.
IMAGE_OPEN_COST_BYTES = 64 << 10


def image_scans(spark: SparkSession) -> AbstractContextManager[None]:
    """The block's ``binaryFile`` scans of images plan their tasks with
    :data:`IMAGE_OPEN_COST_BYTES` as the cost of opening a file (a runtime setting, read when an
    action runs: wrap the actions, not only where the frames are defined)."""
    return sql_conf(spark, {"spark.sql.files.openCostInBytes": str(IMAGE_OPEN_COST_BYTES)})


def _normalise(path: str) -> str:
    # the file index says file:///x where the scan's path column says file:/x
    return "file:/" + path[len("file:///"):] if path.startswith("file:///") else path


def list_images(spark: SparkSession, folder: str) -> DataFrame:
    """``(article_id, image_path)`` for every ``*.jpg`` under ``folder`` (recursively).

    The article id is the file name without ``.jpg``. Paths come from Spark's file index (no
    bytes are read), which also holds zero-byte files; a ``binaryFile`` scan would skip those, and
    an empty image would look like no image instead of going to quarantine. A missing local
    folder gives an empty frame (a catalogue without images is valid).
    """
    schema = StructType([StructField("article_id", StringType()), StructField("image_path", StringType())])
    if "://" not in folder and not Path(folder).is_dir():
        logger.warning("no image folder at %s: articles get no image_path", folder)
        return spark.createDataFrame([], schema)
    reader = (
        spark.read.format("binaryFile")
        .option("pathGlobFilter", "*.jpg")
        .option("recursiveFileLookup", "true")
        .load(folder)
    )
    paths = sorted(_normalise(p) for p in reader.inputFiles())
    files = spark.createDataFrame([(p,) for p in paths], "path string")
    return files.select(
        F.regexp_extract("path", r"([^/]+)\.jpg$", 1).alias("article_id"),
        F.col("path").alias("image_path"),
    ).dropDuplicates(["article_id"])


def image_files(spark: SparkSession, image_paths: DataFrame, content: bool = False) -> DataFrame:
    """The files behind ``image_paths`` (a frame with an ``image_path`` column), via ``binaryFile``.

    Only the folders that hold the wanted files are listed, and the bytes are read only when
    ``content`` is true (Spark prunes the ``content`` column otherwise). Zero-byte files, which
    the scan skips, come from the file index with ``length`` 0 and empty ``content``.

    Returns:
        ``(image_path, length, modification_time[, content])``, one row per existing file; a path
        whose file is gone has no row (the caller counts it as a missing image).
    """
    folders = sorted(
        r[0]
        for r in image_paths.select(F.regexp_extract("image_path", r"^(.*)/[^/]+$", 1)).distinct().collect()
        if r[0]
    )
    existing = [f for f in folders if not f.startswith("file:") or Path(f.removeprefix("file:")).is_dir()]
    columns = ["path", "length", "modificationTime", *(["content"] if content else [])]
    if not existing:
        schema = "image_path string, length long, modification_time timestamp" + (", content binary" if content else "")
        return spark.createDataFrame([], schema)
    reader = spark.read.format("binaryFile").load(existing)
    listed = spark.createDataFrame([(_normalise(p),) for p in reader.inputFiles()], "image_path string")
    scanned = reader.select(*columns).withColumnRenamed("path", "image_path")
    files = listed.join(scanned, "image_path", "left").withColumn("length", F.coalesce("length", F.lit(0).cast("long")))
    if content:
        files = files.withColumn("content", F.coalesce("content", F.lit(b"")))
    return files.withColumnRenamed("modificationTime", "modification_time")
