# handtrace developer entry points. `make help` lists them.
SHELL := /bin/bash
BIN := .venv/bin

.PHONY: help setup demo test test-unit test-integration lint bench agent-deb up down clean

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

setup: ## install everything a fresh machine needs (apt when missing, venv, Kafka jars)
	@bash deploy/setup.sh

demo: setup ## run the whole pipeline on embedded defaults and print what landed
	$(BIN)/handtrace demo

test: setup ## run every test (unit + integration against the real broker and ClickHouse)
	$(BIN)/python -m pytest

test-unit: setup ## unit tests only (no I/O)
	$(BIN)/python -m pytest tests/unit

test-integration: setup ## integration tests only
	$(BIN)/python -m pytest tests/integration

lint: setup ## ruff, then mypy (pydantic plugin; strict on core/ and stream/, see pyproject.toml)
	$(BIN)/ruff check services tests bench
	$(BIN)/python -m mypy

bench: setup ## benchmarks (print ratios against baselines measured in the same run)
	$(BIN)/python -m bench.wire_format
	$(BIN)/python -m bench.agent_footprint
	$(BIN)/python -m bench.agent_footprint --package
	$(BIN)/python -m bench.frame_capture
	$(BIN)/python -m bench.stream_throughput
	$(BIN)/python -m bench.action_reduction
	$(BIN)/python -m bench.dataset_export

agent-deb: setup ## the agent's .deb in dist/ (slim agent, nfpm; docs/agent-rollout.md)
	PYTHON=$(BIN)/python deploy/agent-deb.sh dist

up: setup ## start the local Kafka broker
	$(BIN)/handtrace kafka up

down: ## stop the local Kafka broker
	$(BIN)/handtrace kafka down

clean: down ## remove local state (.handtrace) -- keeps .venv and the jar cache
	rm -rf .handtrace
