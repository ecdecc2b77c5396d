# kiln: `make engines` builds the default model's engines and proves them with an image; `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL ?= digits
BACKEND ?= auto
OUT ?= artifacts/$(MODEL)
PROMPT ?= $(if $(filter digits%,$(MODEL)),a handwritten digit 3,a photograph of an astronaut riding a horse)
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
STAMP := $(VENV)/.installed
# Targets that need the environment depend on $(INSTALL); `make engines INSTALL=` uses what is on PATH as is.
INSTALL ?= $(STAMP)
KILN ?= $(if $(INSTALL),$(BIN)/kiln,kiln)
HAS_NVIDIA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)

.PHONY: install install-tensorrt engines bench bench-digits train-digits test test-fast test-gpu lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
ifeq ($(HAS_NVIDIA),yes)
	$(BIN)/pip install --quiet "torch==$(TORCH_VERSION)"
else
	@echo "no NVIDIA GPU: installing the CPU build of torch $(TORCH_VERSION)"
	$(BIN)/pip install --quiet "torch==$(TORCH_VERSION)+cpu" \
	  || $(BIN)/pip install --quiet "torch==$(TORCH_VERSION)+cpu" --index-url $(TORCH_CPU_INDEX)
endif
	$(BIN)/pip install --quiet -e ".[test,serve,digits]"
	touch $(STAMP)

# TensorRT 11 from NVIDIA's index, for the CUDA major version torch was built with (GPU machines only).
install-tensorrt: $(STAMP)
	cuda=$$($(BIN)/python -c "import torch; print((torch.version.cuda or '').split('.')[0])"); \
	test -n "$$cuda" || { echo "torch here is a CPU build; TensorRT needs a CUDA build of torch"; exit 2; }; \
	extra=$$(test "$$cuda" = 13 && echo tensorrt-cu13 || echo tensorrt); \
	$(BIN)/pip install --quiet -e ".[test,serve,digits,$$extra]" --extra-index-url https://pypi.nvidia.com

engines: $(INSTALL)
	$(KILN) build $(MODEL) --out $(OUT) --backend $(BACKEND)
	$(KILN) generate $(OUT) "$(PROMPT)" --seed 0 -o $(OUT)/sample.png
	$(KILN) inspect $(OUT)

# kiln against diffusers' PyTorch pipeline on `small` (35M-parameter UNet, 256x256), then the scheduler sweep.
BENCH_MODEL ?= small
BENCH_OUT ?= artifacts/$(BENCH_MODEL)
bench: $(INSTALL)
	$(KILN) build $(BENCH_MODEL) --out $(BENCH_OUT) --backend $(BACKEND)
	$(KILN) bench $(BENCH_OUT) --batch 1,2,4 --steps 20 --runs 3 --plot $(BENCH_OUT)/bench.png --save $(BENCH_OUT)/bench.json
	$(KILN) bench $(BENCH_OUT) --schedulers --plot $(BENCH_OUT)/schedulers.png --save $(BENCH_OUT)/schedulers.json

# The speed-quality journey on the trained digits models: the scheduler sweeps with digit accuracy, then
# diffusers' PyTorch DDIM 50 against kiln's DPM++ 20 and LCM 4 side by side (writes artifacts/digits*/).
bench-digits: $(INSTALL)
	$(KILN) build digits --out artifacts/digits --backend $(BACKEND)
	$(KILN) build digits-lcm --out artifacts/digits-lcm --backend $(BACKEND)
	$(KILN) bench artifacts/digits --schedulers --plot artifacts/digits/schedulers.png --save artifacts/digits/schedulers.json
	$(KILN) bench artifacts/digits-lcm --schedulers --plot artifacts/digits-lcm/schedulers.png --save artifacts/digits-lcm/schedulers.json
	$(KILN) bench artifacts/digits --journey artifacts/digits-lcm --plot artifacts/digits/journey.png --save artifacts/digits/journey.json

# Retrain the committed digits weights (digits/weights/): VAE, text encoder, UNet, then the LCM distillation,
# seeded (it rewrites the committed safetensors byte for byte); about 25 minutes for digits and 10 for
# digits-lcm on 2 cores. Not run by CI.
train-digits: $(INSTALL)
	$(if $(INSTALL),$(BIN)/,)python -m digits.train --stage all

# Everything but the `gpu` tier (which skips, saying why, without TensorRT and CUDA).
test: $(INSTALL)
	$(if $(INSTALL),$(BIN)/,)pytest -q

# Unit tests only: no model is exported or built (under a minute).
test-fast: $(INSTALL)
	$(if $(INSTALL),$(BIN)/,)pytest -q -m "not slow and not model and not gpu"

lint: $(INSTALL)
	$(if $(INSTALL),$(BIN)/,)ruff check .

# The TensorRT tests on a GPU machine (after `make install-tensorrt`); elsewhere they skip, saying why.
test-gpu: $(INSTALL)
	$(if $(INSTALL),$(BIN)/,)pytest -q -rs -m gpu

clean:
	rm -rf artifacts exports .pytest_cache
