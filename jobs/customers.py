"""spark-submit entry point: the customers stage. `spark-submit ... jobs/customers.py --conf conf/cluster.yaml`."""

from __future__ import annotations

import sys

from recsys.cli import main as recsys_main


def main(argv: list[str] | None = None) -> int:
    """Run the customers stage with ``--conf``, ``--set``, ``--run-date`` from ``argv``; return the exit code."""
    return recsys_main(["customers", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
