# vlforge make targets. `make demo` and `make test` are all a fresh clone needs.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: install demo test lint format bench bench-recipes gpu-check world corpus report clean

install: $(STAMP)

# torch and torchvision first and pinned: this machine holds exactly these builds on disk.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/vlforge demo --out runs/demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

# The corpus bench serves its images with Debian's nginx, installed here once if missing.
bench: $(STAMP)
	@command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx)
	$(BIN)/python bench/bench_corpus.py
	@for b in bench/bench_parser.py bench/bench_featurize.py bench/bench_mine.py \
		bench/bench_train_step.py bench/bench_train_loader.py bench/bench_scaling.py \
		bench/bench_scale.py; do \
		if [ -f $$b ]; then $(BIN)/python $$b || exit 1; fi; done

# The suite table (all recipes, same budget, on the demo world's shards): run `make demo` first.
bench-recipes: $(STAMP)
	$(BIN)/python bench/bench_recipes.py

# A few minutes on a CUDA GPU: featurize, three recipes' train steps and ZeRO-3 run there.
gpu-check: $(STAMP)
	$(BIN)/python bench/gpu_check.py

world: $(STAMP)
	$(BIN)/vlforge world make --n 1000 --seed 0 --out runs/world/urls.parquet

corpus: $(STAMP)
	$(BIN)/vlforge corpus --urls $(URLS) --out $(OUT)

# The demo's corpus and training run as one static page (override CORPUS/RUN/OUT for others).
report: $(STAMP)
	$(BIN)/vlforge report --corpus $(or $(CORPUS),runs/demo/corpus) \
		--run $(or $(RUN),runs/demo/train) --out $(or $(OUT),runs/demo/report)

clean:
	rm -rf runs bench/work
