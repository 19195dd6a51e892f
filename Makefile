# geoloc: the two commands a newcomer needs are `make demo` and `make test`.
# Both create .venv with pip when it is missing and are quick to repeat afterwards.

PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export GEOLOC_DATA_DIR ?= $(CURDIR)/data
export GEOLOC_RUNS_DIR ?= $(CURDIR)/runs

.PHONY: venv demo test test-quick test-all test-latest latest-venv lock lint bench figures system-deps up down status mlflow-ui clean-demo

# constraints.txt pins every package to the tested version (make lock regenerates it), so a
# fresh clone installs exactly what the suite last passed with.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt --upgrade pip
	# torch and torchvision are pinned as a pair (see DEVELOPERS.md)
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

## make demo: the whole pipeline on the offline demo data, as the Prefect `pipeline` flow:
## demo images -> ingest -> index -> train (demo preset) -> rerank -> report -> leaderboard,
## mirrored to MLflow; it ends by printing where to look.
## The temporary Prefect server creates its database on the first run: on a busy machine that
## takes longer than Prefect's 20 s default, hence the longer wait. Analytics off, as in
## infra/stack.sh: its telemetry heartbeat fails offline and on a busy SQLite file (a traceback).
demo: venv
	PREFECT_LOGGING_EXTRA_LOGGERS=geoloc PREFECT_SERVER_ANALYTICS_ENABLED=false \
	PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=$${PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS:-180} \
	$(BIN)/python -m flows.pipeline

## make test: everything but the long `slow` tests (Prefect/MLflow/S3 servers, browser, PostgreSQL included)
test: venv system-deps
	$(BIN)/python -m pytest -q -m "not slow"

test-quick: venv
	$(BIN)/python -m pytest -q -m "not slow and not server and not browser and not postgres" -x

test-all: venv system-deps
	$(BIN)/python -m pytest -q

## make test-latest: the suite on the newest versions pyproject.toml allows (.venv-latest), to see
## dependency drift on purpose; make lock then writes those versions into constraints.txt.
## Always re-resolved (nothing is stamped): the point is to see what is newest today.
LATEST := .venv-latest
latest-venv:
	@test -x $(LATEST)/bin/python || $(PY) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(LATEST)/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e '.[dev]'

test-latest: latest-venv system-deps
	GEOLOC_UNPINNED=1 $(LATEST)/bin/python -m pytest -q -m "not slow"

lock: latest-venv
	@{ echo "# Exact versions of every package make venv installs (the tested set). Regenerate with: make lock"; \
	  echo "# (torch's own CUDA/triton dependencies follow its exact pins and are left out)."; \
	  $(LATEST)/bin/python -m pip freeze --all --exclude-editable \
	  | grep -vE '^(nvidia-|cuda-|triton)' | sed -E 's/^(torch|torchvision)==([0-9.]+)\+.*/\1==\2/'; \
	} > constraints.txt.tmp && mv constraints.txt.tmp constraints.txt
	@echo "constraints.txt now pins $(LATEST)'s versions: run make test before committing it"

system-deps:
	@bash infra/setup-system.sh

## make lint: ruff, and import-linter's layer contracts (pyproject.toml [tool.importlinter])
lint: venv
	$(BIN)/ruff check geoloc flows tests benchmarks
	$(BIN)/lint-imports

## make bench: every benchmarks/bench_*.py, among them the whole pipeline at N = 10^5
## (bench_scale.py, `python -m benchmarks scale`; its table: docs/scale.md)
bench: venv
	$(BIN)/python -m benchmarks

## make figures: rerun the numbers README.md and docs quote (the demo preset over 3 seeds, test
## and shift splits) and rewrite their <!-- figures:... --> blocks (benchmarks/figures.py; each
## seed's run is cached, a rerun trains only what is missing; ~5 min per seed on an idle machine)
figures: venv
	$(BIN)/python -m benchmarks figures $(FIGURES_ARGS)

## make up / down / status: local Prefect server + work pool + deployments + worker (infra/stack.sh)
up: venv
	@bash infra/stack.sh up

down:
	@bash infra/stack.sh down

status:
	@bash infra/stack.sh status

mlflow-ui: venv
	$(BIN)/mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri $${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db}
