"""H&M Personalized Fashion Recommendations files (Kaggle, 2022).

Reads ``articles.csv``, ``customers.csv``, ``transactions_train.csv`` and
``images/0XX/<article_id>.jpg``. ``article_id`` is a 10-digit zero-padded string and stays one.
About 14% of articles have an image; a missing image is normal (``image_path`` null).
"""

from __future__ import annotations

import datetime as dt
import math
import re
from dataclasses import replace

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from recsys.sources.base import ROW, CsvSpec, SourceRead, read_csv_checked
from recsys.sources.images import list_images

ARTICLE_ID = re.compile(r"^\d{10}$")
PRODUCT_CODE = re.compile(r"^\d{7}$")
CUSTOMER_ID = re.compile(r"^[0-9a-f]{64}$")

ARTICLE_COLUMNS = (
    "article_id", "product_code", "prod_name", "product_type_name", "product_group_name",
    "graphical_appearance_name", "colour_group_name", "perceived_colour_value_name",
    "perceived_colour_master_name", "department_name", "index_name", "index_group_name",
    "section_name", "garment_group_name", "detail_desc",
)
# attributes kept in the canonical ``attributes`` map (besides the canonical columns)
ARTICLE_ATTRIBUTES = (
    "product_type_name", "product_group_name", "graphical_appearance_name",
    "perceived_colour_value_name", "perceived_colour_master_name", "department_name",
    "index_name", "index_group_name", "section_name", "garment_group_name",
)


def validate_article(row: dict[str, str]) -> tuple[dict[str, str | None] | None, str | None]:
    """Validate one ``articles.csv`` row: 10-digit ``article_id``, 7-digit ``product_code``."""
    article_id = row["article_id"].strip()
    if not ARTICLE_ID.match(article_id):
        return None, f"bad article_id {article_id!r}: expected 10 digits"
    if not PRODUCT_CODE.match(row["product_code"].strip()):
        return None, f"bad product_code {row['product_code']!r}: expected 7 digits"
    if not row["prod_name"].strip():
        return None, "empty prod_name"
    return {k: (v.strip() or None) for k, v in row.items()}, None


def validate_customer(row: dict[str, str]) -> tuple[dict[str, str | None] | None, str | None]:
    """Validate one ``customers.csv`` row: 64-hex ``customer_id``, integer age, finite flags."""
    customer_id = row["customer_id"].strip()
    if not CUSTOMER_ID.match(customer_id):
        return None, f"bad customer_id {customer_id[:80]!r}: expected 64 hex characters"
    out: dict[str, str | None] = {k: (v.strip() or None) for k, v in row.items()}
    for flag in ("FN", "Active"):
        value = out[flag]
        if value is not None and _float(value) is None:
            return None, f"bad {flag} {value!r}: expected a finite number or empty"
    age = out["age"]
    if age is not None:
        number = _float(age)
        if number is None or not number.is_integer() or not 0 <= number <= 130:
            return None, f"bad age {age!r}: expected an integer 0..130 or empty"
        out["age"] = str(int(number))
    return out, None


def validate_transaction(row: dict[str, str]) -> tuple[dict[str, str | None] | None, str | None]:
    """Validate one ``transactions_train.csv`` row: ISO date, ids, finite price >= 0, channel 1 or 2.
    (A date later than the run's is rejected by the ingest stage, which knows the run.)"""
    try:
        dt.date.fromisoformat(row["t_dat"].strip())
    except ValueError:
        return None, f"unparsable t_dat {row['t_dat']!r}: expected YYYY-MM-DD"
    if not CUSTOMER_ID.match(row["customer_id"].strip()):
        return None, f"bad customer_id {row['customer_id'][:80]!r}: expected 64 hex characters"
    if not ARTICLE_ID.match(row["article_id"].strip()):
        return None, f"bad article_id {row['article_id']!r}: expected 10 digits"
    price = _float(row["price"].strip())
    if price is None or price < 0:
        return None, f"unparsable price {row['price']!r}: expected a finite number >= 0"
    if row["sales_channel_id"].strip() not in ("1", "2"):
        return None, f"bad sales_channel_id {row['sales_channel_id']!r}: expected 1 or 2"
    return {k: v.strip() for k, v in row.items()}, None


def _float(value: str) -> float | None:
    """The finite number ``value`` spells, else None (``nan``, ``inf`` are not accepted)."""
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


ARTICLES_CSV = CsvSpec(ARTICLE_COLUMNS, ARTICLE_COLUMNS, validate_article, key=("article_id",))
CUSTOMER_COLUMNS = ("customer_id", "FN", "Active", "club_member_status", "fashion_news_frequency", "age", "postal_code")
CUSTOMERS_CSV = CsvSpec(CUSTOMER_COLUMNS, CUSTOMER_COLUMNS, validate_customer, key=("customer_id",))
TRANSACTION_COLUMNS = ("t_dat", "customer_id", "article_id", "price", "sales_channel_id")
TRANSACTIONS_CSV = CsvSpec(TRANSACTION_COLUMNS, TRANSACTION_COLUMNS, validate_transaction)


def read_articles(spark: SparkSession, root: str) -> SourceRead:
    """``articles.csv`` in the canonical schema, with ``image_path`` from ``images/``.

    Returns:
        A :class:`~recsys.sources.base.SourceRead` whose ``accepted`` has the canonical columns
        plus ``_row``.
    """
    read = read_csv_checked(spark, f"{root}/articles.csv", ARTICLES_CSV)
    images = list_images(spark, f"{root}/images")
    articles = read.accepted.select(
        "article_id",
        F.col("product_code").alias("product_group_id"),
        F.col("prod_name").alias("name"),
        F.col("detail_desc").alias("description"),
        F.col("index_group_name").alias("category_l1"),
        F.col("product_group_name").alias("category_l2"),
        F.col("product_type_name").alias("category_l3"),
        F.col("colour_group_name").alias("colour"),
        F.create_map(*[x for a in ARTICLE_ATTRIBUTES for x in (F.lit(a), F.col(a))]).alias("attributes"),
        ROW,
    )
    return replace(read, accepted=articles.join(images, "article_id", "left"))


def read_customers(spark: SparkSession, root: str) -> SourceRead:
    """``customers.csv`` typed for the ``customers`` table."""
    read = read_csv_checked(spark, f"{root}/customers.csv", CUSTOMERS_CSV)
    customers = read.accepted.select(
        "customer_id",
        F.col("FN").cast("double").alias("fn"),
        F.col("Active").cast("double").alias("active"),
        "club_member_status",
        "fashion_news_frequency",
        F.col("age").cast("int").alias("age"),
        "postal_code",
    )
    return replace(read, accepted=customers)


def read_transactions(spark: SparkSession, root: str) -> SourceRead:
    """``transactions_train.csv`` typed for the ``transactions`` table (``row_number`` = line)."""
    read = read_csv_checked(spark, f"{root}/transactions_train.csv", TRANSACTIONS_CSV)
    transactions = read.accepted.select(
        F.to_date("t_dat").alias("t_dat"),
        "customer_id",
        "article_id",
        F.col(ROW).alias("row_number"),
        F.col("price").cast("double").alias("price"),
        F.col("sales_channel_id").cast("int").alias("sales_channel_id"),
    )
    return replace(read, accepted=transactions)
