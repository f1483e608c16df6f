"""Listing product images with Spark's ``binaryFile`` source (local disk, HDFS or object store)."""

from __future__ import annotations

import logging
from pathlib import Path

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StringType, StructField, StructType

logger = logging.getLogger(__name__)


def list_images(spark: SparkSession, folder: str) -> DataFrame:
    """``(article_id, image_path)`` for every ``*.jpg`` under ``folder`` (recursively).

    The article id is the file name without ``.jpg``; only paths are read, not the bytes. A
    missing local folder gives an empty frame (a catalogue without images is valid).
    """
    schema = StructType([StructField("article_id", StringType()), StructField("image_path", StringType())])
    if "://" not in folder and not Path(folder).is_dir():
        logger.warning("no image folder at %s: articles get no image_path", folder)
        return spark.createDataFrame([], schema)
    files = (
        spark.read.format("binaryFile")
        .option("pathGlobFilter", "*.jpg")
        .option("recursiveFileLookup", "true")
        .load(folder)
        .select("path")
    )
    return files.select(
        F.regexp_extract("path", r"([^/]+)\.jpg$", 1).alias("article_id"),
        F.col("path").alias("image_path"),
    ).dropDuplicates(["article_id"])
