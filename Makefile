# Everything runs inside .venv, created on first use: `make test` and `make demo` work on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
# On these machines torch==2.13.0 is a CPU build installed from local disk; override for CUDA,
# e.g. `make install TORCH=torch`.
TORCH  ?= torch==2.13.0
PY      = $(VENV)/bin/python
RUN     = $(VENV)/bin/llmcli
DEMO_DIR ?= runs/demo
DEMO_MINUTES ?= 3

.PHONY: install test test-fast test-gguf demo demo-lstm lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

test: install
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow"

# The GGUF tests against the real llama.cpp: builds llama-cpp-python from source on first use (about
# 4.5 minutes on 2 cores, so not part of `make test`, where these tests skip), then runs tests/llamacpp.
test-gguf: install
	CMAKE_ARGS="$${CMAKE_ARGS:--DGGML_NATIVE=ON}" $(PY) -m pip install -q -e ".[gguf]"
	$(PY) -m pytest -v -s -rA tests/llamacpp

# Prepare Shakespeare, train the char model for DEMO_MINUTES (replacing an earlier demo run),
# score it on the held-out test plays and print a sample.
demo: install
	$(RUN) data prepare --config configs/shakespeare-char.yaml
	$(RUN) train --config configs/shakespeare-char.yaml --out $(DEMO_DIR) --overwrite \
		train.max_minutes=$(DEMO_MINUTES)
	$(RUN) eval $(DEMO_DIR)/best --split test
	$(RUN) generate $(DEMO_DIR)/best "ROMEO:" --max-new-tokens 300 --seed 1

# The same with the LSTM recipe, then its int8 quantization (`make demo-lstm DEMO_MINUTES=5`: the
# full recipe).
demo-lstm: install
	$(RUN) train --config configs/shakespeare-lstm.yaml --out $(DEMO_DIR)-lstm --overwrite \
		train.max_minutes=$(DEMO_MINUTES)
	$(RUN) eval $(DEMO_DIR)-lstm/best --split test --percent
	$(RUN) generate $(DEMO_DIR)-lstm/best "ROMEO:" --max-new-tokens 300 --seed 1
	$(RUN) quantize $(DEMO_DIR)-lstm/best --method int8 --out $(DEMO_DIR)-lstm-int8 --overwrite

# Every table prints ratios against a baseline measured in the same run (about 40 minutes on 2 cores).
bench: install
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_decode.py
	$(PY) benchmarks/bench_quantize.py
	$(PY) benchmarks/bench_data.py --sizes 50  # the 500 MB and 2 GB rows: docs/corpora.md
	$(PY) benchmarks/bench_serve.py
	$(PY) benchmarks/bench_serving.py
	$(PY) benchmarks/bench_paged.py
	$(PY) benchmarks/bench_recurrent.py
	$(PY) benchmarks/bench_finetune.py
	$(PY) benchmarks/bench_strategy.py
	$(PY) benchmarks/bench_seq2seq.py
	$(PY) benchmarks/bench_compress.py

lint: install
	$(VENV)/bin/ruff check llmcli tests benchmarks
	$(VENV)/bin/vulture

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build dist *.egg-info runs
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
