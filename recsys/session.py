"""The one place that builds the SparkSession.

Locally (``spark.master`` set and not under ``spark-submit``) Delta comes in through
:func:`delta.configure_spark_with_delta_pip`, which asks Maven Central for
``io.delta:delta-spark_<spark major.minor>_2.13``. Tables live in a Hive-compatible catalog whose
Derby metastore and warehouse sit under ``spark.warehouse_dir``, so ``recsys.*`` tables stay
registered between runs. Under ``spark-submit`` the master, packages and resources come from the
command line and the cluster; only the SQL extensions and settings recsys depends on are added.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from pyspark.sql import SparkSession

from recsys.config import Config

logger = logging.getLogger(__name__)

DELTA_EXTENSION = "io.delta.sql.DeltaSparkSessionExtension"
DELTA_CATALOG = "org.apache.spark.sql.delta.catalog.DeltaCatalog"


class SparkStartError(RuntimeError):
    """Spark could not start; the message says the likely cause and the fix."""


def under_spark_submit() -> bool:
    """True when this Python process was launched by ``spark-submit`` (the JVM is already up)."""
    return "PYSPARK_GATEWAY_PORT" in os.environ or "SPARK_SUBMIT_OPTS" in os.environ


def warehouse_path(cfg: Config) -> Path:
    """The absolute local warehouse folder (``spark.warehouse_dir``)."""
    return Path(cfg.spark.warehouse_dir).expanduser().resolve()


@contextmanager
def sql_conf(spark: SparkSession, settings: Mapping[str, str]) -> Iterator[None]:
    """Set runtime SQL settings for the ``with`` block, then restore what was there before.

    A stage that tunes the session for one step (e.g. the Arrow batch size of a pandas UDF)
    does so inside this block, so the caller's session, possibly shared with other work (a
    notebook, a test run), keeps its settings. A key that was unset is unset again.

    Args:
        spark: the session.
        settings: ``spark.sql.*`` (or other runtime) keys and their values for the block.
    """
    before = {key: spark.conf.get(key, None) for key in settings}
    for key, value in settings.items():
        spark.conf.set(key, value)
    try:
        yield
    finally:
        for key, old in before.items():
            if old is None:
                spark.conf.unset(key)
            else:
                spark.conf.set(key, old)


def _reuse_active(settings: Mapping[str, str]) -> SparkSession | None:
    """The active session, left as it is, or ``None`` when there is none.

    ``SparkSession.builder.getOrCreate`` would apply this configuration's settings to a running
    session and so retune it for everyone sharing it (a notebook, a test run, another job in
    the same application). A job started inside such a session uses it as it is and says which
    of its settings differ.

    Raises:
        SparkStartError: the active session has no Delta SQL extension, so Delta tables would
            not work in it.
    """
    active = SparkSession.getActiveSession()
    if active is None:
        return None
    extensions = active.conf.get("spark.sql.extensions", "") or ""
    if DELTA_EXTENSION not in extensions:
        raise SparkStartError(
            f"a SparkSession is already running without Delta ({DELTA_EXTENSION} is not in spark.sql.extensions); "
            "stop it or start it with Delta configured (delta.configure_spark_with_delta_pip)"
        )
    differing = sorted(
        key for key, value in settings.items()
        if key.startswith("spark.sql.") and active.conf.get(key, None) not in (value, None)
    )
    if differing:
        logger.info("reusing the running SparkSession as it is; its %s differ from the configuration", differing)
    return active


def build_spark(cfg: Config) -> SparkSession:
    """Build the SparkSession for ``cfg``, or return the running one unchanged.

    When a session is already active (a notebook, a test run, a job inside another
    application), it is returned as it is: none of ``cfg.spark`` is applied to it, so the
    session's other users keep their settings.

    Args:
        cfg: the run configuration; ``cfg.spark`` sets master, driver memory, shuffle
            partitions, the warehouse folder and extra ``spark.*`` settings.

    Returns:
        A session with Delta's SQL extension and catalog, Arrow on, and the ``recsys`` settings.

    Raises:
        SparkStartError: the JVM did not start, most often because the Delta jars could not be
            fetched from Maven Central (no network, or a proxy Spark does not use); or the
            running session has no Delta.
    """
    settings: dict[str, str] = {
        "spark.app.name": cfg.spark.app_name,
        "spark.sql.extensions": DELTA_EXTENSION,
        "spark.sql.catalog.spark_catalog": DELTA_CATALOG,
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.shuffle.partitions": str(cfg.spark.shuffle_partitions),
        "spark.sql.session.timeZone": "UTC",
        "spark.databricks.delta.schema.autoMerge.enabled": "false",
    }
    settings.update({k: v for k, v in cfg.spark.conf.items() if k.startswith("spark.sql.")})
    active = _reuse_active(settings)
    if active is not None:
        return active
    local = not under_spark_submit()
    if local:
        warehouse = warehouse_path(cfg)
        warehouse.mkdir(parents=True, exist_ok=True)
        settings.update(
            {
                "spark.master": cfg.spark.master,
                "spark.driver.memory": cfg.spark.driver_memory,
                "spark.ui.showConsoleProgress": "false",
                "spark.sql.warehouse.dir": str(warehouse),
                "spark.sql.catalogImplementation": "hive",
                "spark.hadoop.javax.jdo.option.ConnectionURL": (
                    f"jdbc:derby:;databaseName={warehouse / 'metastore_db'};create=true"
                ),
                "spark.driver.extraJavaOptions": f"-Dderby.system.home={warehouse}",
            }
        )
        # Python workers run the driver's interpreter (the virtual environment), not whatever
        # `python3` is first on PATH; pyspark reads only the environment variable for this.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    settings.update(cfg.spark.conf)

    builder = SparkSession.builder
    for key, value in settings.items():
        builder = builder.config(key, value)
    if local and cfg.spark.delta_from_pip:
        from delta import configure_spark_with_delta_pip

        builder = configure_spark_with_delta_pip(builder)
    try:
        spark = builder.getOrCreate()
    except Exception as err:  # the JVM's own failure arrives as a generic PySparkRuntimeError
        if "JAVA_GATEWAY_EXITED" in str(err) or "Java gateway" in str(err):
            raise SparkStartError(
                "Spark's JVM exited before it started. With delta_from_pip on, the usual cause is "
                "that the Delta jars (io.delta:delta-spark_2.13) could not be fetched from Maven "
                "Central: check the network, or put the jars in a folder and pass them with "
                "--set spark.delta_from_pip=false --set spark.conf.spark.jars=<jar,jar>. "
                f"Original error: {err}"
            ) from err
        raise
    spark.sparkContext.setLogLevel("WARN")
    _drop_jar_includes(spark)
    logger.info(
        "spark %s, master %s, warehouse %s",
        spark.version,
        spark.sparkContext.master,
        spark.conf.get("spark.sql.warehouse.dir"),
    )
    return spark


def _drop_jar_includes(spark: SparkSession) -> None:
    """Keep the ``--packages`` jars (Delta's, Java only) off the Python workers' ``sys.path``.

    spark-submit lists every jar fetched through ``spark.jars.packages`` as a Python include,
    and a Spark 4.0 Python worker calls ``importlib.invalidate_caches()`` for every task, which
    makes each zip importer read its jar's directory again (hadoop-client-runtime's thousands of
    entries): about 0.1 s per task per core, half the cost of a small ``mapInArrow`` pass
    (measured: 16 tasks on 2 cores, 3.0-3.3 s with the jars, 1.6-1.9 s without). Fixed upstream
    by SPARK-54744 (apache/spark#53518, only invalidate when needed). Python code shipped with
    ``--py-files`` (``.py``, ``.zip``, ``.egg``) stays; the JVM keeps the jars on its classpath.
    """
    includes = getattr(spark.sparkContext, "_python_includes", None)
    if isinstance(includes, list):
        includes[:] = [p for p in includes if not str(p).lower().endswith(".jar")]
