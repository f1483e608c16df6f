"""Ingest with injected bad rows: every reject lands in quarantine with its reason, counts add up."""

from __future__ import annotations

from pathlib import Path

import pytest
from delta.tables import DeltaTable
from pyspark.sql import functions as F

from recsys import tables
from recsys.sources.base import SourceError
from recsys.stages import ingest as ingest_module
from recsys.stages.ingest import run as ingest_run
from tests.conftest import REPO, cache_is_empty, test_config
from tests.spark.hm_fixture import write_fashion, write_hm

pytestmark = pytest.mark.spark

_ENSURED: set[str] = set()


def ingest(spark, cfg, run_id: str) -> dict:  # type: ignore[no-untyped-def]
    """The ingest stage, after creating its database's tables once (as ``pipeline.run`` does)."""
    if cfg.data.database not in _ENSURED:
        tables.ensure_tables(spark, cfg.data.database)
        _ENSURED.add(cfg.data.database)
    return ingest_run(spark, cfg, run_id)


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
    spark.catalog.clearCache()
    report = ingest(spark, cfg, "r1")
    assert cache_is_empty(spark)  # the parsed files were unpersisted

    assert_rejects(quarantined(spark, "ingest_hm", "r1"), expected)
    files = {Path(f["source"]).name: f for f in report["files"]}
    assert {n: (f["input"], f["accepted"], f["quarantined"]) for n, f in files.items()} == {
        "articles.csv": (9, 5, 4),
        "customers.csv": (5, 2, 3),
        "transactions_train.csv": (10, 3, 7),
    }
    articles = tables.read(spark, "ingest_hm", tables.ARTICLES)
    assert sorted(r["article_id"] for r in articles.collect()) == ["0100000001", "0100000002", "0200000001", "0500000001",
                                                                           "0600000001"]
    first = articles.where("article_id = '0100000001'").first()
    assert first["name"] == "Strap top"  # the first occurrence wins, the duplicate is quarantined
    assert first["product_group_id"] == "0100000" and first["category_l3"] == "Vest top"
    assert first["attributes"]["garment_group_name"] == "Jersey Basic"
    jeans = articles.where("article_id = '0200000001'").first()
    assert jeans["description"] == "Denim, 5-pocket."
    assert articles.where("article_id = '0600000001'").first()["description"] == 'Soft\ncotton, "long".'
    bad_bytes = tables.read(spark, "ingest_hm", tables.QUARANTINE).where("row = 10 AND source LIKE '%articles.csv'").first()
    assert "Bad \ufffd name" in bad_bytes["record"]  # the record as read, for whoever fixes the file
    hoodie = articles.where("article_id = '0500000001'").first()
    assert hoodie["description"] is None and hoodie["image_path"] is None
    transactions = tables.read(spark, "ingest_hm", tables.TRANSACTIONS)
    assert transactions.count() == 3  # the repeated line is a second unit, not a duplicate
    per_day = {str(r["t_dat"]): r["count"] for r in transactions.groupBy("t_dat").count().collect()}
    assert per_day == {"2020-09-01": 2, "2020-09-02": 1}
    customers = tables.read(spark, "ingest_hm", tables.CUSTOMERS).orderBy("customer_id").collect()
    assert [(c["age"], c["fn"]) for c in customers] == [(31, 1.0), (None, None)]


def _drop_one(df, column: str, value: object):  # type: ignore[no-untyped-def]
    return df.where(F.col(column) != value)


@pytest.mark.parametrize(
    ("write", "file", "expected"),
    [
        ("articles", "articles.csv", "9 input rows but 4 committed to {db}.articles + 4 in {db}.quarantine"),
        ("transactions", "transactions_train.csv",
         "10 input rows but 2 committed to {db}.transactions + 7 in {db}.quarantine"),
        ("quarantine", "articles.csv", "9 input rows but 5 committed to {db}.articles + 3 in {db}.quarantine"),
    ],
)
def test_a_row_lost_by_a_write_fails_the_run(spark, warehouse: Path, tmp_path: Path, monkeypatch, write: str,  # type: ignore[no-untyped-def]
                                             file: str, expected: str) -> None:
    """The balance is taken from what the writes committed, so a write that drops a row fails
    ingest, naming the file; the parse counts alone would still add up."""
    write_hm(tmp_path / "hm")
    db = f"ingest_lost_{write}"  # one each: a rerun on the same tables writes no transaction day
    cfg = test_config(warehouse, db, "data.source=hm", f"data.path={tmp_path / 'hm'}")
    if write == "articles":
        original_articles = ingest_module._write_articles
        monkeypatch.setattr(ingest_module, "_write_articles", lambda spark, cfg, run_id, df, source: original_articles(
            spark, cfg, run_id, _drop_one(df, "article_id", "0200000001"), source))
    elif write == "transactions":
        original_replace = tables.replace

        def lossy_replace(spark, database, spec, df, where):  # type: ignore[no-untyped-def]
            if spec is tables.TRANSACTIONS:
                df = df.where(F.col("row_number") != 3)
            original_replace(spark, database, spec, df, where)

        monkeypatch.setattr(tables, "replace", lossy_replace)
    else:
        original_quarantine = ingest_module._quarantine
        monkeypatch.setattr(ingest_module, "_quarantine", lambda spark, cfg, run_id, rejected: original_quarantine(
            spark, cfg, run_id, [(s, _drop_one(df, "row", 6) if s.endswith("articles.csv") else df) for s, df in rejected]))
    with pytest.raises(RuntimeError) as err:
        ingest(spark, cfg, "r1")
    assert f"/{file}: {expected.format(db=db)}" in str(err.value) and "1 row(s) unaccounted for" in str(err.value)


def test_rerun_leaves_the_same_tables(spark, warehouse: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    write_hm(tmp_path / "hm")
    cfg = test_config(warehouse, "ingest_rerun", "data.source=hm", f"data.path={tmp_path / 'hm'}")
    assert ingest(spark, cfg, "r1")["transaction_days_written"] == 2
    before = {s.name: tables.read(spark, "ingest_rerun", s).collect() for s in
              (tables.ARTICLES, tables.CUSTOMERS, tables.TRANSACTIONS, tables.QUARANTINE)}
    assert ingest(spark, cfg, "r1")["transaction_days_written"] == 0  # no day differs: none rewritten
    after = {s.name: tables.read(spark, "ingest_rerun", s).collect() for s in
             (tables.ARTICLES, tables.CUSTOMERS, tables.TRANSACTIONS, tables.QUARANTINE)}
    for name in ("articles", "customers", "transactions", "quarantine"):
        assert sorted(map(tuple, before[name]), key=str) == sorted(map(tuple, after[name]), key=str), name
    # the same run again after record 5's bad article_id was fixed: its quarantine row goes
    articles = tmp_path / "hm" / "articles.csv"
    articles.write_bytes(articles.read_bytes().replace(b"12345,0300000", b"0300000001,0300000"))
    report = ingest(spark, cfg, "r1")
    assert [(f["input"], f["accepted"], f["quarantined"]) for f in report["files"]][0] == (9, 6, 3)
    assert [r for r, _ in quarantined(spark, "ingest_rerun", "r1")["articles.csv"]] == [6, 7, 10]
    # the next day's file has one more day: that day is appended, the others are not rewritten
    transactions = tmp_path / "hm" / "transactions_train.csv"
    transactions.write_text(transactions.read_text() + f"2020-09-05,{'a' * 64},0100000002,0.02,2\n")
    assert ingest(spark, cfg, "run-2020-09-06")["transaction_days_written"] == 1
    written = {(str(r["t_dat"]), r["run_id"]) for r in tables.read(spark, "ingest_rerun", tables.TRANSACTIONS).collect()}
    assert written == {("2020-09-01", "r1"), ("2020-09-02", "r1"), ("2020-09-05", "run-2020-09-06")}


def test_changed_and_removed_articles_are_updated(spark, warehouse: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "hm"
    write_hm(root)
    cfg = test_config(warehouse, "ingest_change", "data.source=hm", f"data.path={root}")
    ingest(spark, cfg, "r1")
    old = {r["article_id"]: r for r in tables.read(spark, "ingest_change", tables.ARTICLES).collect()}
    lines = (root / "articles.csv").read_bytes().splitlines()
    lines = [l.replace(b"Slim jeans", b"Skinny jeans") for l in lines if not l.startswith(b"0500000001")]
    (root / "articles.csv").write_bytes(b"\n".join(lines) + b"\n")
    # one article of a few is more than ingest.max_deletion_share (5%): stop, write nothing
    version = DeltaTable.forName(spark, "ingest_change.articles").history(1).first()["version"]
    with pytest.raises(SourceError, match=r"articles.csv: would delete 1 of the \d+ articles .* "
                                          r"ingest.allow_mass_deletion=true"):
        ingest(spark, cfg, "r2")
    assert DeltaTable.forName(spark, "ingest_change.articles").history(1).first()["version"] == version
    cfg = test_config(warehouse, "ingest_change", "data.source=hm", f"data.path={root}", "ingest.allow_mass_deletion=true")
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
    text = (root / "articles.csv").read_bytes().replace(b"prod_name", b"product_name", 1)
    (root / "articles.csv").write_bytes(text)
    cfg = test_config(warehouse, "ingest_bad", "data.source=hm", f"data.path={root}")
    with pytest.raises(SourceError, match=r"nocol/articles.csv: missing required column\(s\) \['prod_name'\]"):
        ingest(spark, cfg, "r1")
