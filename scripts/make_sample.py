"""Rebuild the bundled demo catalogue ``data/sample/fashion`` from Fashion Product Images (Small).

Usage: ``python scripts/make_sample.py ../shared/data/fashion-small data/sample/fashion``

Draws a stratified sample (one stratum per masterCategory/subCategory, at least one row each,
the rest proportional; ``random.Random(20261121)``), keeps every ``styles.csv`` line
byte-identical and in its original order, always keeps the rows whose name has an unquoted comma
(they exercise the adapter's field-count repair), and copies each sampled row's image. The result
stays under the project's 10 MB limit for bundled data.
"""

from __future__ import annotations

import csv
import io
import random
import shutil
import sys
from collections import defaultdict
from pathlib import Path

TARGET_ROWS = 640
ALWAYS_KEEP = {"23100", "23114", "23103"}


def main(src: Path, dst: Path) -> int:
    lines = (src / "styles.csv").read_bytes().decode("utf-8").splitlines(keepends=True)
    header, body = lines[0], lines[1:]
    strata: dict[tuple[str, str], list[str]] = defaultdict(list)
    by_id: dict[str, str] = {}
    for line in body:
        fields = next(csv.reader(io.StringIO(line)))
        by_id[fields[0]] = line
        strata[(fields[2], fields[3])].append(fields[0])
    rng = random.Random(20261121)
    share = TARGET_ROWS / len(body)
    chosen: set[str] = set(ALWAYS_KEEP & by_id.keys())
    for key in sorted(strata):
        ids = sorted(strata[key])
        n = max(1, round(len(ids) * share))
        chosen.update(rng.sample(ids, min(n, len(ids))))
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "images").mkdir(exist_ok=True)
    with open(dst / "styles.csv", "w", encoding="utf-8", newline="") as out:
        out.write(header)
        for line in body:
            if next(csv.reader(io.StringIO(line)))[0] in chosen:
                out.write(line)
    for article in sorted(chosen):
        shutil.copyfile(src / "images" / f"{article}.jpg", dst / "images" / f"{article}.jpg")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
