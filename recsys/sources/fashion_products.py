"""Fashion Product Images (Kaggle, Param Aggarwal): ``styles.csv`` + ``images/<id>.jpg``.

``NA`` (and an empty field) means missing. Some names carry an unquoted comma, which splits the
last column: the surplus fields are joined back into ``productDisplayName``. There are no
colour/size variants, so ``product_group_id`` is the article's own id.
"""

from __future__ import annotations

import re
from dataclasses import replace

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from recsys.sources.base import ROW, CsvSpec, SourceRead, read_csv_checked
from recsys.sources.images import list_images

STYLE_ID = re.compile(r"^\d+$")
COLUMNS = (
    "id", "gender", "masterCategory", "subCategory", "articleType", "baseColour",
    "season", "year", "usage", "productDisplayName",
)
ATTRIBUTES = ("gender", "season", "year", "usage")


def validate_style(row: dict[str, str]) -> tuple[dict[str, str | None] | None, str | None]:
    """Validate one ``styles.csv`` row: numeric id, a name, a 4-digit year or missing."""
    out = {k: (None if v.strip() in ("", "NA") else " ".join(v.split())) for k, v in row.items()}
    style_id = out["id"]
    if style_id is None or not STYLE_ID.match(style_id):
        return None, f"bad id {row['id']!r}: expected digits"
    if out["productDisplayName"] is None:
        return None, "missing productDisplayName"
    year = out["year"]
    if year is not None:
        try:
            out["year"] = str(int(float(year)))
        except (ValueError, OverflowError):
            return None, f"bad year {year!r}: expected an integer or NA"
    return out, None


STYLES_CSV = CsvSpec(COLUMNS, COLUMNS, validate_style, key=("id",), repair_tail="productDisplayName")


def read_articles(spark: SparkSession, root: str) -> SourceRead:
    """``styles.csv`` in the canonical schema, with ``image_path`` from ``images/``.

    Returns:
        A :class:`~recsys.sources.base.SourceRead` whose ``accepted`` has the canonical columns
        plus ``_row``.
    """
    read = read_csv_checked(spark, f"{root}/styles.csv", STYLES_CSV)
    images = list_images(spark, f"{root}/images")
    articles = read.accepted.select(
        F.col("id").alias("article_id"),
        F.col("id").alias("product_group_id"),
        F.col("productDisplayName").alias("name"),
        F.lit(None).cast("string").alias("description"),
        F.col("masterCategory").alias("category_l1"),
        F.col("subCategory").alias("category_l2"),
        F.col("articleType").alias("category_l3"),
        F.col("baseColour").alias("colour"),
        F.create_map(*[x for a in ATTRIBUTES for x in (F.lit(a), F.col(a))]).alias("attributes"),
        ROW,
    )
    return replace(read, accepted=articles.join(images, "article_id", "left"))
