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
	$(BIN)/pip install --quiet -e '.[dev,champ]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# `make demo REBUILD=1` pretrains the world's base model from scratch with the committed model's
# recipe (docs/world.md: 150 minutes, then the same run continued to 235 minutes with the
# privileged role's copying style; about 4 hours of wall time on two cores, resumable) and runs
# the demo on it instead of the committed model; the demo checks the new model's validity first.
WORLD_MODEL := runs/world-base
demo: $(STAMP)
ifdef REBUILD
	test -f runs/world-pretrain/phase1/config.json || $(BIN)/dail world pretrain \
		--work runs/world-pretrain --out runs/world-pretrain/phase1 --minutes 150
	test -f $(WORLD_MODEL)/config.json || $(BIN)/dail world pretrain \
		--work runs/world-pretrain --out $(WORLD_MODEL) --minutes 235 --copy-rate 0.1
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
