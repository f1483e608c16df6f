"""spark-submit entry point: the ingest stage. `spark-submit ... jobs/ingest.py --conf conf/cluster.yaml`."""

from __future__ import annotations

import sys

from recsys.cli import main as recsys_main


def main(argv: list[str] | None = None) -> int:
    """Run the ingest stage with ``--conf``, ``--set``, ``--run-date`` from ``argv``; return the exit code."""
    return recsys_main(["ingest", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
