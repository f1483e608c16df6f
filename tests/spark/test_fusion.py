"""The fused vector's layout is decided once, stored with the fused model_id, and what the
neighbours stage reads, even when a modality with vectors in the table is switched off."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pyspark.sql.types import ArrayType, FloatType, IntegerType, StringType, StructField, StructType

from recsys import tables
from recsys.fusion import FusionLayout, load_layout
from recsys.stages import neighbours
from recsys.stages.embed import embed_metadata, fuse
from tests.conftest import test_config, write_table

pytestmark = pytest.mark.spark

DIMS = {"behaviour": 3, "image": 5, "metadata": 2}
MODELS = {"behaviour": "als@b1", "image": "img@i1", "metadata": "onehot@m1"}


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    v = rng.standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_neighbours_read_the_layout_the_fused_vectors_were_written_with(spark, warehouse: Path) -> None:  # type: ignore[no-untyped-def]
    db = "fusion_layout"
    tables.ensure_tables(spark, db)
    rng = np.random.default_rng(4)
    ids = [f"a{i:02d}" for i in range(30)]
    write_table(spark, db, tables.ARTICLES, spark.createDataFrame(
        [(a, f"type{i % 3}") for i, a in enumerate(ids)], "article_id string, category_l3 string"))
    vectors = {m: unit_rows(rng, len(ids), d) for m, d in DIMS.items()}
    rows = [(a, m, MODELS[m], vectors[m][i].tolist(), DIMS[m]) for m in DIMS for i, a in enumerate(ids)]
    schema = StructType([StructField("article_id", StringType()), StructField("modality", StringType()),
                         StructField("model_id", StringType()), StructField("vector", ArrayType(FloatType(), False)),
                         StructField("dim", IntegerType())])
    write_table(spark, db, tables.ITEM_EMBEDDINGS, spark.createDataFrame(rows, schema))
    # image is switched off: its vectors stay in the table, the fused vector leaves it out
    cfg = test_config(warehouse, db, "image.enabled=false", "text.enabled=false", "knn.modalities=[fused]",
                      "knn.recall_sample=0", "quality.probe_max_iter=0", "knn.k=5")
    report = fuse(spark, cfg, "r1", {"behaviour": MODELS["behaviour"], "metadata": MODELS["metadata"]})  # type: ignore[arg-type]
    layout = load_layout(spark, db, report["model_id"])
    assert layout.segments == (("behaviour", 0, 3), ("metadata", 3, 5)) and layout.model_id == report["model_id"]
    assert FusionLayout.from_json(layout.to_json()) == layout
    assert [p.weight for p in layout.parts] == [cfg.fusion.weights["behaviour"], cfg.fusion.weights["metadata"]]  # type: ignore[attr-defined]

    neighbours.run(spark, cfg, "r1")  # type: ignore[arg-type]
    lists = tables.read(spark, db, tables.ITEM_NEIGHBOURS).where("modality = 'fused'").collect()
    assert len(lists) == 30 * 5
    position = {a: i for i, a in enumerate(ids)}
    for row in lists:
        assert set(row["modality_scores"]) == {"behaviour", "metadata"}, row
        i, j = position[row["article_id"]], position[row["neighbour_id"]]
        for m, score in row["modality_scores"].items():
            assert score == pytest.approx(float(vectors[m][i] @ vectors[m][j]), abs=1e-5), (row, m)
    with pytest.raises(LookupError, match="no layout for fused model fused@000000000000"):
        load_layout(spark, db, "fused@000000000000")


def test_a_new_category_value_keeps_the_metadata_model_and_rewrites_only_its_article(  # type: ignore[no-untyped-def]
        spark, warehouse: Path) -> None:
    db = "metadata_vocabulary"
    tables.ensure_tables(spark, db)
    cfg = test_config(warehouse, db, "metadata.columns=[category_l3, colour]")
    articles = [(f"a{i:02d}", f"type{i % 3}", f"colour{i % 4}") for i in range(20)]

    def day(rows: list[tuple[str, str, str]], run_id: str) -> dict:  # type: ignore[type-arg]
        write_table(spark, db, tables.ARTICLES, spark.createDataFrame(
            rows, "article_id string, category_l3 string, colour string"))
        return embed_metadata(spark, cfg, run_id)  # type: ignore[arg-type]

    def vectors() -> dict[str, tuple[list[float], str]]:
        return {r["article_id"]: (r["vector"], r["run_id"]) for r in tables.read(spark, db, tables.ITEM_EMBEDDINGS)
                .where("modality = 'metadata'").collect()}

    first = day(articles, "r1")
    assert (first["articles"], first["new_vocabulary"]) == (20, True)
    before = vectors()
    # another modality's row of the article removed below: the metadata MERGE is confined to its
    # own partition (``within``) and leaves it
    text_row = ("a00", "text", "m", [1.0], 1, "h", "r0")
    tables.merge(spark, db, tables.ITEM_EMBEDDINGS, spark.createDataFrame([text_row], tables.ITEM_EMBEDDINGS.schema))
    # day N+1: a new product type and a new colour for one new article, one article removed
    second = day([*articles[1:], ("a99", "type9", "colour9")], "r2")
    assert (second["model_id"], second["dim"], second["new_vocabulary"]) == (first["model_id"], first["dim"], False)
    assert second["labels_added"] == 2
    after = vectors()
    assert set(after) == set(before) - {"a00"} | {"a99"}
    assert [tuple(r) for r in tables.read(spark, db, tables.ITEM_EMBEDDINGS).where("modality = 'text'").collect()] == [
        tuple(text_row)]
    with pytest.raises(ValueError, match="within and delete_missing"):
        tables.merge(spark, db, tables.ITEM_EMBEDDINGS, spark.createDataFrame([text_row], tables.ITEM_EMBEDDINGS.schema),
                     delete_missing="true", within="t.modality = 'text'")
    assert {a for a, (_, run_id) in after.items() if run_id == "r2"} == {"a99"}  # no other row rewritten
    assert all(after[a] == before[a] for a in after if a != "a99")
    new = np.asarray(after["a99"][0])
    assert np.linalg.norm(new) == pytest.approx(1.0) and all(abs(new @ np.asarray(v)) < 1e-7 for v, _ in before.values())
    recipes = tables.read(spark, db, tables.MODELS).where("modality = 'metadata'").collect()
    assert len(recipes) == 1 and recipes[0]["run_id"] == "r1"  # the vocabulary grew in place
