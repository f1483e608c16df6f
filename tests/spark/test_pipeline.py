"""The pipeline on a small slice of the bundled sample: idempotent reruns, incremental embedding."""

from __future__ import annotations

from pathlib import Path

import pytest

from recsys import tables
from recsys.pipeline import run
from tests.conftest import REPO, test_config

pytestmark = pytest.mark.spark

SAMPLE = REPO / "data" / "sample" / "fashion"


def slice_sample(target: Path, n: int) -> None:
    target.mkdir(parents=True)
    lines = (SAMPLE / "styles.csv").read_text().splitlines(keepends=True)[: n + 1]
    (target / "styles.csv").write_text("".join(lines))
    (target / "images").symlink_to(SAMPLE / "images")


def snapshot(spark, db: str) -> dict[str, list[str]]:  # type: ignore[no-untyped-def]
    out = {}
    for spec in (tables.ARTICLES, tables.QUARANTINE, tables.ITEM_EMBEDDINGS, tables.ITEM_NEIGHBOURS,
                 tables.ITEM_RECOMMENDATIONS):
        out[spec.name] = sorted(str(tuple(r)) for r in tables.read(spark, db, spec).collect())
    return out


def test_two_runs_leave_the_same_tables_and_skip_unchanged_text(spark, warehouse: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Every stage twice on 40 sample articles. Image training, the probe, the recall check and
    the text and metadata neighbour lists are off here: the e2e run and their own tests cover them."""
    n = 40
    slice_sample(tmp_path / "fp", n)
    cfg = test_config(
        warehouse, "pipeline_idem", f"data.path={tmp_path / 'fp'}", "image.weights=none", "image.height=64",
        "image.width=48", "quality.probe_max_iter=0", "knn.recall_sample=0", "knn.modalities=[fused, image]",
    )
    first_report = run(spark, cfg, "run-a")
    first = snapshot(spark, "pipeline_idem")
    second_report = run(spark, cfg, "run-a")
    second = snapshot(spark, "pipeline_idem")
    for name in first:
        assert first[name] == second[name], name
    assert first_report["embed"]["text"]["embedded"] == n
    assert second_report["embed"]["text"]["embedded"] == 0  # unchanged text, unchanged model
    assert first_report["embed"]["image"]["embedded"] > 0 and second_report["embed"]["image"]["embedded"] == 0
    assert len(first["item_recommendations"]) == n * 12
    # the rerun found nothing new: no neighbour search, no new lists
    assert {m: second_report["neighbours"][m]["mode"] for m in ("fused", "image")} == {"fused": "unchanged",
                                                                                      "image": "unchanged"}
    assert second_report["recommend"]["skipped"] == "inputs unchanged since run run-a"
    runs = tables.read(spark, "pipeline_idem", tables.RUNS).collect()
    assert [(r["run_id"], r["status"]) for r in runs] == [("run-a", "succeeded")]

    # maintain: OPTIMIZE and VACUUM (retention 0 here) keep every table's rows and delete the
    # files no current version needs
    from delta.tables import DeltaTable

    from recsys.stages import maintain

    location = Path(tables.location(spark, "pipeline_idem", tables.ITEM_EMBEDDINGS).removeprefix("file:"))
    files_before = len(list(location.rglob("*.parquet")))
    report = maintain.run(spark, cfg.model_copy(update={"maintain": cfg.maintain.model_copy(
        update={"retention_hours": 0, "tables": ["item_embeddings", "item_neighbours"]})}), "run-m")  # type: ignore[attr-defined]
    assert snapshot(spark, "pipeline_idem") == second and set(report) == {"retention_hours", "item_embeddings",
                                                                          "item_neighbours"}
    embeddings = report["item_embeddings"]
    current = int(DeltaTable.forName(spark, "pipeline_idem.item_embeddings").detail().first()["numFiles"])
    assert embeddings["files_after"] == current == len(list(location.rglob("*.parquet"))) < files_before
    # a retention other than 0 goes into the table property Delta 4's VACUUM reads
    maintain.run(spark, cfg.model_copy(update={"maintain": cfg.maintain.model_copy(
        update={"retention_hours": 24, "tables": ["item_neighbours"], "optimize": False})}), "run-m")  # type: ignore[attr-defined]
    properties = DeltaTable.forName(spark, "pipeline_idem.item_neighbours").detail().first()["properties"]
    assert properties["delta.deletedFileRetentionDuration"] == "interval 24 hours"
