# The two commands a new user needs: `make demo` and `make test`. Everything else is a helper.
PYTHON ?= python3
DEV_PORT ?= 3000
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home

.PHONY: install demo test lint typecheck pytest dev screenshots db-start db-stop clean

$(STAMP): pyproject.toml
	@echo "Creating $(VENV) and installing the project with its dev tools (a few minutes the first time)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## virtualenv with the project, every extra and the dev tools

demo: install  ## embedded database, sample data, every month with work embedded, checks, a search
	$(BIN)/embedding-pipeline demo

test: lint typecheck pytest  ## ruff, mypy and the whole pytest suite

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

pytest: install
	$(BIN)/pytest

# `embedding-pipeline dev` starts the database, writes $(DAGSTER_HOME)/dagster.yaml (no
# telemetry, no pop-up) and becomes `dagster dev` with SIGINT and SIGTERM handled, so that
# SIGTERM stops it even when a script started `make dev &` (make passes SIGTERM on to it)
dev: install  ## the Dagster UI and daemon on the embedded database (http://127.0.0.1:3000)
	$(BIN)/embedding-pipeline dev --port $(DEV_PORT)

screenshots: install  ## the browser walk-through, keeping its screenshots in docs/ui/
	EP_UI_SCREENSHOT_DIR=$(CURDIR)/docs/ui $(BIN)/pytest embedding_pipeline_tests/ui

db-start: install
	$(BIN)/embedding-pipeline db start

db-stop: install
	$(BIN)/embedding-pipeline db stop

clean:  ## stop the embedded database and remove every generated folder
	-[ -x $(BIN)/embedding-pipeline ] && $(BIN)/embedding-pipeline db stop
	rm -rf $(VENV) .pgdata .dagster_home .pytest_cache .mypy_cache .ruff_cache *.egg-info
