# recsys: `make run` (set up and run the main job) and `make test` (set up and pass the tests).
#   make run                                   the bundled Fashion Product sample
#   make run SOURCE=hm DATA=/path/to/hm        the H&M competition files (conf/hm.yaml)
#   make run ARGS="--set knn.k=20"             any other overrides
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The environment is installed with uv (from PyPI, pinned below): it downloads and unpacks the
# wheels in parallel, about a quarter of pip's time for this set (torch brings ~3 GB of CUDA
# wheels). torch/torchvision must come from PyPI as a matched pair: ignore any machine-wide
# find-links folder that could offer a local `+cpu` build.
UV_VERSION := 0.13.9
UV := env -u PIP_FIND_LINKS -u UV_FIND_LINKS $(VENV)/bin/uv pip install -q --python $(PY)
SOURCE ?=
CONF ?= $(if $(SOURCE),$(SOURCE),local)
DATA ?=
ARGS ?=
PYTEST_ARGS ?=

.PHONY: venv run test test-unit lint bench bench-knn wheel clean

$(VENV)/.installed: requirements.txt requirements-nodeps.txt setup.py
	$(PYTHON) -m venv $(VENV)
	env -u PIP_FIND_LINKS $(PY) -m pip install -q uv==$(UV_VERSION)
	$(UV) -r requirements.txt
	$(UV) --no-deps -r requirements-nodeps.txt
	$(UV) --no-deps -e .
	touch $@

venv: $(VENV)/.installed

run: venv
	$(VENV)/bin/recsys run --conf $(CONF) $(if $(DATA),--set data.path=$(DATA)) $(ARGS)

# two pytest-xdist workers, each with its own local Spark session. --dist loadscope keeps a module
# on one worker, so the e2e module's pipeline run happens once; without reordering, tests/e2e (the
# longest) starts first and the other worker takes the rest.
test: venv
	$(PY) -m pytest -q -n 2 --dist loadscope --no-loadscope-reorder $(PYTEST_ARGS)

test-unit: venv
	$(PY) -m pytest -q tests/unit

lint: venv
	$(VENV)/bin/ruff check recsys jobs tests benchmarks
	$(VENV)/bin/mypy recsys

bench: venv
	$(PY) -m benchmarks.text_embedding
	$(PY) -m benchmarks.image_embedding

# KNN backends side by side (H&M text vectors and 1M synthetic vectors; about an hour on 2 cores)
bench-knn: venv
	$(PY) -m benchmarks.knn

wheel: venv
	$(PY) -m build --wheel --no-isolation

clean:
	rm -rf spark-warehouse spark-warehouse-hm build dist *.egg-info
