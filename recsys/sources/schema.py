"""The canonical ``articles`` schema that every catalogue source maps into.

| column | meaning |
|---|---|
| ``article_id`` | string key (H&M: 10-digit zero-padded, never an int) |
| ``product_group_id`` | the product that colour/size variants share (H&M ``product_code``) |
| ``name``, ``description`` | display name and free text (description may be empty) |
| ``category_l1`` .. ``category_l3`` | category levels, broadest first; ``category_l3`` is the product type |
| ``colour`` | colour name |
| ``attributes`` | every other source attribute, ``map<string,string>`` |
| ``image_path`` | path or URI of the product image, null when the article has none |
"""

from __future__ import annotations

import re
import string

from pyspark.sql.types import MapType, StringType, StructField, StructType

CANONICAL_FIELDS: tuple[str, ...] = (
    "article_id",
    "product_group_id",
    "name",
    "description",
    "category_l1",
    "category_l2",
    "category_l3",
    "colour",
)

# Fields a text template may use (``{name}``, ``{category_l3}`` ...).
TEMPLATE_FIELDS: tuple[str, ...] = CANONICAL_FIELDS[1:]

CANONICAL_SCHEMA = StructType(
    [StructField(name, StringType(), name != "article_id") for name in CANONICAL_FIELDS]
    + [
        StructField("attributes", MapType(StringType(), StringType()), True),
        StructField("image_path", StringType(), True),
    ]
)


def template_fields(template: str) -> list[str]:
    """The field names a ``str.format`` template refers to, in order.

    Raises:
        ValueError: if the template is not a valid format string.
    """
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def render_text(template: str, fields: dict[str, str | None]) -> str:
    """Fill ``template`` with an article's fields; missing values become empty strings.

    Empty sentences left behind by missing values (``". ."``) are collapsed, and the result is
    stripped, so an article without a description does not end in dangling punctuation.

    Args:
        template: a ``str.format`` template over :data:`TEMPLATE_FIELDS`.
        fields: field name to value (``None`` for missing).

    Returns:
        The article text, a single line.
    """
    values = {name: (fields.get(name) or "").strip() for name in template_fields(template)}
    text = " ".join(template.format(**values).split())
    # a run of separators left by empty values collapses to one: "." if it holds one, else ","
    text = _SEPARATORS.sub(lambda m: "." if "." in m.group(0) else ",", text)
    text = re.sub(r"\s+([.,])", r"\1", text)
    text = text.strip(" ,.")
    return f"{text}." if text else ""


_SEPARATORS = re.compile(r"[.,](?:\s*[.,])+")
