"""spark-submit entry point: the daily refresh, every stage in order.

    spark-submit --packages io.delta:delta-spark_4.0_2.13:4.4.0 \
      --py-files dist/recsys-0.1.0-py3-none-any.whl jobs/refresh.py --conf conf/cluster.yaml
"""

from __future__ import annotations

import sys

from recsys.cli import main as recsys_main


def main(argv: list[str] | None = None) -> int:
    """Run all stages with ``--conf``, ``--set``, ``--run-date`` from ``argv``; return the exit code."""
    return recsys_main(["run", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
