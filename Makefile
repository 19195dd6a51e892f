# geoloc: the two commands a newcomer needs are `make demo` and `make test`.
# Both create .venv with pip when it is missing and are quick to repeat afterwards.

PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export GEOLOC_DATA_DIR ?= $(CURDIR)/data
export GEOLOC_RUNS_DIR ?= $(CURDIR)/runs

.PHONY: venv demo test test-quick test-all lint bench system-deps up down status mlflow-ui clean-demo

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch and torchvision are pinned as a pair (see DEVELOPERS.md)
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[dev]'
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

system-deps:
	@bash infra/setup-system.sh

## make lint: ruff, and import-linter's layer contracts (pyproject.toml [tool.importlinter])
lint: venv
	$(BIN)/ruff check geoloc flows tests benchmarks
	$(BIN)/lint-imports

bench: venv
	$(BIN)/python -m benchmarks

## make up / down / status: local Prefect server + work pool + deployments + worker (infra/stack.sh)
up: venv
	@bash infra/stack.sh up

down:
	@bash infra/stack.sh down

status:
	@bash infra/stack.sh status

mlflow-ui: venv
	$(BIN)/mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri $${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db}
