# fracture-ops: `make demo` and `make test` are the README's two commands.
SHELL := /bin/bash
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_ROOT ?= data/demo
RUN_ID ?= demo
export NO_ALBUMENTATIONS_UPDATE=1 GX_ANALYTICS_ENABLED=False MLFLOW_DISABLE_TELEMETRY=true \
       HF_HUB_OFFLINE=1 YOLO_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1

.PHONY: help install demo test lint bench gpu-check clean up down pacs pacs-down

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# pinned install: constraints.txt holds the exact versions that work together (pip check clean)
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install -q -c constraints.txt -e '.[all,dev]'
	$(BIN)/pip check
	@touch $(STAMP)

install: $(STAMP)  ## create .venv and install the package with all extras (pinned)

demo: install  ## run the fracture_training DAG end to end on synthetic data (SQLite Airflow)
	@FRACTURE_OPS_ARTIFACT_ROOT=$(DEMO_ROOT)/artifacts $(BIN)/python -m fracture_ops.orchestration.demo --root $(DEMO_ROOT) --run-id $(RUN_ID)

TEST_WORKERS ?= 2
test: lint  ## lint, then run the whole test suite (unit, real data, integration) on TEST_WORKERS processes
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=10

up: install  ## start Airflow (standalone) and the MLflow UI on loopback, DAGs loaded
	@$(BIN)/python -m fracture_ops.orchestration.devstack up

down:  ## stop what `make up` started
	@$(BIN)/python -m fracture_ops.orchestration.devstack down

pacs: install  ## start the bundled Orthanc PACS alone (Debian's orthanc, orthanc-dicomweb) on loopback
	@$(BIN)/python -m fracture_ops.orchestration.devstack pacs

pacs-down:  ## stop the PACS `make pacs` started
	@$(BIN)/python -m fracture_ops.orchestration.devstack pacs-down

lint: install  ## ruff, the layering contracts (lint-imports; see ARCHITECTURE.md), trigger forms up to date
	$(BIN)/ruff check fracture_ops dags tests benchmarks
	$(BIN)/lint-imports --no-logo
	$(BIN)/python -m fracture_ops.orchestration.params --check

bench: install  ## run the benchmarks (prints ratios against their baselines)
	@status=0; for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || status=1; done; exit $$status

gpu-check: install  ## on a CUDA machine: GPU training throughput, a YOLOv8n epoch, gpu tests (<8 min)
	$(BIN)/python benchmarks/gpu_check.py

clean:  ## remove demo outputs (keeps .venv)
	rm -rf $(DEMO_ROOT)
