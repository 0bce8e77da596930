# Every target sets up .venv on first use, so each works as the first command on a new machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

CONFIG     ?= configs/default.toml
DATA       ?=
RUN_DIR    ?=
ARGS       ?=
EXPORT_DIR ?= export
MODEL_NAME ?= charrnn
PORT       ?= 8500
REST_PORT  ?= 8501
MONITORING_CONFIG ?=
PRIME      ?=
NUM_CHARS  ?= 500
SEED       ?= 0
BATCHING   ?= 1

.DEFAULT_GOAL := help
.PHONY: help install train sample export serve test lint bench

help:  ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'
	@echo "  variables: CONFIG=$(CONFIG) DATA=<text file or dir> RUN_DIR=<run> ARGS='--set k=v'"

$(STAMP): pyproject.toml charrnn_keras/native/lstm_op.cc
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@# oneDNN's fused LSTM op for training; without it (no g++), training uses TensorFlow ops.
	-$(BIN)/python -m charrnn_keras.native_lstm
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the package with its dev tools

train: $(STAMP)  ## train (CONFIG, DATA, RUN_DIR, ARGS); re-run the same command to resume
	$(BIN)/charrnn train --config $(CONFIG) $(if $(DATA),--data $(DATA)) \
		$(if $(RUN_DIR),--run-dir $(RUN_DIR)) $(ARGS)

# Without RUN_DIR, charrnn picks the newest run of CONFIG: the one `make train` made last.
RUN_OR_CONFIG = $(if $(RUN_DIR),--run-dir $(RUN_DIR),--config $(CONFIG))

sample: $(STAMP)  ## write text with a run (RUN_DIR, default the newest of CONFIG; PRIME, NUM_CHARS, SEED)
	$(BIN)/charrnn sample $(RUN_OR_CONFIG) --prime '$(PRIME)' \
		--num-chars $(NUM_CHARS) --seed $(SEED) $(ARGS)

export: $(STAMP)  ## export a run (RUN_DIR, default the newest of CONFIG) as a new SavedModel version
	$(BIN)/charrnn export $(RUN_OR_CONFIG) --export-dir $(EXPORT_DIR) \
		--model-name $(MODEL_NAME) $(ARGS)

# REST_PORT 8501 is the TF Serving image's; MONITORING_CONFIG, a MonitoringConfig text proto,
# serves Prometheus metrics on it. TF Serving's request batching uses
# export/batching_parameters.txt (written by charrnn export); BATCHING=0 turns it off, e.g. for
# an export batched in its graph (--batching_parameters_file).
MONITORING_FLAG = $(if $(MONITORING_CONFIG),--monitoring_config_file=$(abspath $(MONITORING_CONFIG)))

serve: $(STAMP)  ## serve export/ on PORT (gRPC) and REST_PORT: tensorflow_model_server if installed, else ours
	@if command -v tensorflow_model_server >/dev/null; then \
		tensorflow_model_server --port=$(PORT) --rest_api_port=$(REST_PORT) $(MONITORING_FLAG) \
			--tensorflow_intra_op_parallelism=1 \
			--model_config_file=$(abspath $(EXPORT_DIR))/models.config \
			$(if $(filter 1,$(BATCHING)),--enable_batching \
			--batching_parameters_file=$(abspath $(EXPORT_DIR))/batching_parameters.txt); \
	else \
		$(BIN)/charrnn serve --export-dir $(EXPORT_DIR) --model-name $(MODEL_NAME) --port $(PORT) \
			--rest_api_port $(REST_PORT) $(MONITORING_FLAG) \
			$(if $(wildcard $(EXPORT_DIR)/models.config),--model_config_file $(EXPORT_DIR)/models.config); \
	fi

test: $(STAMP)  ## run the test suite
	$(BIN)/pytest -q

lint: $(STAMP)  ## ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)  ## run the benchmarks and rewrite BENCHMARKS.md (installs torch==2.13.0)
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python bench/run_all.py $(ARGS)
