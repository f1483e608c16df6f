"""Ingest with injected bad rows: every reject lands in quarantine with its reason, counts add up."""

from __future__ import annotations

from pathlib import Path

import pytest
from pyspark.sql import functions as F

from recsys import tables
from recsys.ingest import ingest
from recsys.sources.base import SourceError
from tests.conftest import REPO, test_config
from tests.spark.hm_fixture import write_fashion, write_hm

pytestmark = pytest.mark.spark


def quarantined(spark, db: str, run_id: str) -> dict[str, list[tuple[int, str]]]:  # type: ignore[no-untyped-def]
    rows = tables.read(spark, db, tables.QUARANTINE).where(F.col("run_id") == run_id).collect()
    out: dict[str, list[tuple[int, str]]] = {}
    for r in sorted(rows, key=lambda r: (r["source"], r["row"])):
        out.setdefault(Path(r["source"]).name, []).append((r["row"], r["reason"]))
    return out


def assert_rejects(found: dict[str, list[tuple[int, str]]], expected: dict[str, list[tuple[int, str]]]) -> None:
    assert sorted(found) == sorted(expected)
    for name, rows in expected.items():
        assert [line for line, _ in found[name]] == [line for line, _ in rows], name
        for (_, reason), (_, fragment) in zip(found[name], rows):
            assert fragment in reason, (name, reason, fragment)


def test_hm_bad_rows_go_to_quarantine_and_counts_add_up(spark, warehouse: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    expected = write_hm(tmp_path / "hm")
    cfg = test_config(warehouse, "ingest_hm", "data.source=hm", f"data.path={tmp_path / 'hm'}")
    report = ingest(spark, cfg, "r1")

    assert_rejects(quarantined(spark, "ingest_hm", "r1"), expected)
    files = {Path(f["source"]).name: f for f in report["files"]}
    assert {n: (f["input"], f["accepted"], f["quarantined"]) for n, f in files.items()} == {
        "articles.csv": (7, 4, 3),
        "customers.csv": (4, 2, 2),
        "transactions_train.csv": (8, 3, 5),
    }
    articles = tables.read(spark, "ingest_hm", tables.ARTICLES)
    assert sorted(r["article_id"] for r in articles.collect()) == ["0100000001", "0100000002", "0200000001", "0500000001"]
    first = articles.where("article_id = '0100000001'").first()
    assert first["name"] == "Strap top"  # the first occurrence wins, the duplicate is quarantined
    assert first["product_group_id"] == "0100000" and first["category_l3"] == "Vest top"
    assert first["attributes"]["garment_group_name"] == "Jersey Basic"
    jeans = articles.where("article_id = '0200000001'").first()
    assert jeans["description"] == "Denim, 5-pocket."
    hoodie = articles.where("article_id = '0500000001'").first()
    assert hoodie["description"] is None and hoodie["image_path"] is None
    transactions = tables.read(spark, "ingest_hm", tables.TRANSACTIONS)
    assert transactions.count() == 3  # the repeated line is a second unit, not a duplicate
    per_day = {str(r["t_dat"]): r["count"] for r in transactions.groupBy("t_dat").count().collect()}
    assert per_day == {"2020-09-01": 2, "2020-09-02": 1}
    customers = tables.read(spark, "ingest_hm", tables.CUSTOMERS).orderBy("customer_id").collect()
    assert [(c["age"], c["fn"]) for c in customers] == [(31, 1.0), (None, None)]


def test_rerun_leaves_the_same_tables(spark, warehouse: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    write_hm(tmp_path / "hm")
    cfg = test_config(warehouse, "ingest_rerun", "data.source=hm", f"data.path={tmp_path / 'hm'}")
    ingest(spark, cfg, "r1")
    before = {s.name: tables.read(spark, "ingest_rerun", s).collect() for s in
              (tables.ARTICLES, tables.CUSTOMERS, tables.TRANSACTIONS, tables.QUARANTINE)}
    ingest(spark, cfg, "r1")
    after = {s.name: tables.read(spark, "ingest_rerun", s).collect() for s in
             (tables.ARTICLES, tables.CUSTOMERS, tables.TRANSACTIONS, tables.QUARANTINE)}
    for name in ("articles", "customers", "transactions", "quarantine"):
        assert sorted(map(tuple, before[name]), key=str) == sorted(map(tuple, after[name]), key=str), name


def test_changed_and_removed_articles_are_updated(spark, warehouse: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "hm"
    write_hm(root)
    cfg = test_config(warehouse, "ingest_change", "data.source=hm", f"data.path={root}")
    ingest(spark, cfg, "r1")
    old = {r["article_id"]: r for r in tables.read(spark, "ingest_change", tables.ARTICLES).collect()}
    lines = (root / "articles.csv").read_text().splitlines()
    lines = [l.replace("Slim jeans", "Skinny jeans") for l in lines if not l.startswith("0500000001")]
    (root / "articles.csv").write_text("\n".join(lines) + "\n")
    ingest(spark, cfg, "r2")
    new = {r["article_id"]: r for r in tables.read(spark, "ingest_change", tables.ARTICLES).collect()}
    assert "0500000001" not in new
    assert new["0200000001"]["name"] == "Skinny jeans"
    assert new["0200000001"]["content_hash"] != old["0200000001"]["content_hash"]
    assert new["0200000001"]["run_id"] == "r2"
    assert new["0100000002"]["run_id"] == "r1"  # unchanged rows are not rewritten


def test_fashion_products_repairs_commas_and_reads_na(spark, warehouse: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    expected = write_fashion(tmp_path / "fp", REPO / "data" / "sample" / "fashion" / "images")
    cfg = test_config(warehouse, "ingest_fp", f"data.path={tmp_path / 'fp'}")
    report = ingest(spark, cfg, "r1")
    assert_rejects(quarantined(spark, "ingest_fp", "r1"), expected)
    assert (report["files"][0]["input"], report["files"][0]["accepted"], report["files"][0]["quarantined"]) == (6, 3, 3)
    rows = {r["article_id"]: r for r in tables.read(spark, "ingest_fp", tables.ARTICLES).collect()}
    assert rows["23100"]["name"] == "Turtle Men Navy Tie, Cufflink and Pocket Square Combo Set"
    assert rows["39386"]["attributes"]["year"] is None and rows["39386"]["attributes"]["usage"] is None
    assert rows["15970"]["image_path"].endswith("images/15970.jpg")
    assert rows["23100"]["image_path"] is None  # no image file: normal, not an error


def test_whole_file_problems_fail_fast_naming_file_and_column(spark, warehouse: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = test_config(warehouse, "ingest_bad", "data.source=hm", f"data.path={tmp_path / 'none'}")
    with pytest.raises(SourceError, match=r"none/articles.csv: file not found"):
        ingest(spark, cfg, "r1")
    root = tmp_path / "nocol"
    write_hm(root)
    text = (root / "articles.csv").read_text().replace("prod_name", "product_name", 1)
    (root / "articles.csv").write_text(text)
    cfg = test_config(warehouse, "ingest_bad", "data.source=hm", f"data.path={root}")
    with pytest.raises(SourceError, match=r"nocol/articles.csv: missing required column\(s\) \['prod_name'\]"):
        ingest(spark, cfg, "r1")
