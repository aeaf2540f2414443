# Imagine: every entry point. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help setup data demo test test-unit test-integration lint format typecheck proto train train-captioner eval-captioner serve bench clean

help: ## list the entry points
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "Python 3.11 is required (torch 2.14.1 wheels)")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[server,dev]'
	touch $(STAMP)

setup: $(STAMP) data ## create .venv and install everything (pinned by constraints.txt)

data: ## install the Fashion-MNIST package (Debian dataset-fashion-mnist) if missing
	@if [ ! -f $(FMNIST) ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	  else \
	    echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist'"; exit 1; \
	  fi; \
	fi

demo: setup ## the main job on the embedded default: ingest Fashion-MNIST, search, evaluate
	$(BIN)/imagine demo

test-deps: ## redis-server (tests start their own), RabbitMQ and PostgreSQL on loopback
	@command -v redis-server >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; \
	  else \
	    echo "redis-server is missing: run 'sudo apt-get install redis-server'"; exit 1; \
	  fi; }
	@if ! (echo > /dev/tcp/127.0.0.1/5672) 2>/dev/null; then \
	  if [ "$$(id -u)" != 0 ]; then \
	    echo "RabbitMQ is not running on 127.0.0.1:5672: run 'sudo apt-get install rabbitmq-server'"; exit 1; \
	  fi; \
	  command -v rabbitmq-server >/dev/null || { apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server; }; \
	  (echo > /dev/tcp/127.0.0.1/5672) 2>/dev/null || rabbitmq-server -detached; \
	  rabbitmqctl await_startup --timeout 120 >/dev/null; \
	fi
	@if ! (echo > /dev/tcp/127.0.0.1/5432) 2>/dev/null; then \
	  if [ "$$(id -u)" != 0 ]; then \
	    echo "PostgreSQL is not running on 127.0.0.1:5432 (user postgres, password postgres, or set IMAGINE_TEST_POSTGRES_URL)"; exit 1; \
	  fi; \
	  command -v pg_ctlcluster >/dev/null || { apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; }; \
	  pg_ctlcluster --skip-systemctl-redirect "$$(ls /etc/postgresql | sort -V | tail -1)" main start || true; \
	  for i in $$(seq 60); do (echo > /dev/tcp/127.0.0.1/5432) 2>/dev/null && break; sleep 1; done; \
	  runuser -u postgres -- psql -qc "ALTER USER postgres PASSWORD 'postgres'"; \
	fi

test: setup test-deps ## the whole test suite (unit, integration on loopback, end to end)
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

test-unit: setup ## unit tests only (tiny in-memory models)
	$(BIN)/pytest -m "not integration and not e2e and not slow" $(PYTEST_ARGS)

lint: setup ## ruff lint and format check, mypy on handwritten code
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy imagine services workers trainer protos/codegen.py bench

format: setup ## apply ruff formatting and fixes
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

proto: setup ## regenerate protos/gen from protos/imagine/v1/*.proto
	$(BIN)/python -m protos.codegen

train: setup ## retrain the default checkpoint (checkpoints/fmnist-dual) with Ray Train
	$(BIN)/imagine train --epochs 5 --output checkpoints/fmnist-dual --name fmnist-dual

train-captioner: setup ## retrain the caption decoder (checkpoints/fmnist-captioner), then its eval
	$(BIN)/imagine train --stage captioner --limit 20000 --epochs 2 --output checkpoints/fmnist-captioner --no-resume

eval-captioner: setup ## BLEU-4, R@1/5/10 both ways with and without the caption path, category mAP
	$(BIN)/imagine train --stage captioner --eval-only --output checkpoints/fmnist-captioner --eval-out eval/captioner

serve: setup ## run the embedded profile until Ctrl-C
	$(BIN)/imagine serve

bench: setup ## ingestion throughput and query latency, services vs in-process
	$(BIN)/python -m bench

clean: ## remove the virtual environment and caches (not your data in ~/.imagine)
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
