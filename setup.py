"""recsys: a distributed batch product recommender on Apache Spark, Delta Lake and PyTorch.

Dependencies are pinned in requirements.txt / requirements-nodeps.txt (with the reasons) and
installed by `make venv`; install_requires names only what the wheel needs at import time on a
cluster that already has Spark and PyTorch.
"""

from setuptools import find_packages, setup

setup(
    name="recsys",
    version="0.1.0",
    description="Batch hybrid recommender for product catalogues: Spark, Delta Lake, PyTorch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["recsys", "recsys.*"]),
    package_data={"recsys": ["py.typed"]},
    data_files=[("conf", ["conf/base.yaml", "conf/local.yaml", "conf/cluster.yaml", "conf/hm.yaml"])],
    install_requires=[
        "pyspark>=4.0.1,<4.1",
        "delta-spark>=4.0,<4.5",
        "pyarrow>=11,<15",
        "numpy>=1.24,<2",
        "pandas>=2.0",
        "torch>=2.2",
        "transformers>=4.40",
        "pydantic>=2.5",
        "PyYAML>=6.0",
    ],
    # `recsys evaluate` writes an HTML report with charts and a t-SNE map
    extras_require={"report": ["matplotlib>=3.7", "scikit-learn>=1.3", "Pillow>=10.0"]},
    entry_points={"console_scripts": ["recsys=recsys.cli:main"]},
)
