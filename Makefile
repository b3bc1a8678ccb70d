# One-command set-up for a fresh machine: a virtualenv in .venv with the CPU build of torch and the project.
# GPU users: install a CUDA build of torch into the venv first (see README), then `make setup`.
# `make demo` installs only what the demo needs (the project and its `demo` extra, VADER); `make test` adds the
# `test` extra (the offline references: transformers, tensorflow-cpu, ...).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup setup-demo corpus test-packages demo test bench gpu-check clean-venv

$(VENV)/.base: pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	touch $@

$(VENV)/.installed-demo: $(VENV)/.base
	$(PY) -m pip install --quiet -e ".[demo]"
	touch $@

$(VENV)/.installed: $(VENV)/.base
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

setup: $(VENV)/.installed

setup-demo: $(VENV)/.installed-demo

# The demo's corpus: Debian's fortunes (real English prose, installed offline from Debian's packages).
corpus:
	@if [ ! -d /usr/share/games/fortunes ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && apt-get install -y -qq fortunes >/dev/null; \
	  else \
	    echo "the demo needs Debian's fortunes corpus: run 'sudo apt-get install fortunes'"; exit 1; \
	  fi; \
	fi

# Debian packages the tests use, installed in one apt-get call when missing (as root): the demo's corpus (fortunes)
# and the labeling app's browser test (chromium, chromium-driver; without them tests/labeling/test_browser.py skips).
test-packages:
	@missing=""; \
	[ -d /usr/share/games/fortunes ] || missing="$$missing fortunes"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null 2>&1 || missing="$$missing chromium-driver"; \
	if [ -n "$$missing" ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "note: the tests want Debian's$$missing: run 'sudo apt-get install$$missing'"; \
	  fi; \
	fi

# The main job: an offline RLHF experiment end to end on the CPU (see README "Quick start").
demo: setup-demo corpus
	$(PY) launch.py demo

# The test suite (offline, CPU).
test: setup test-packages corpus
	$(PY) -m pytest -q --durations=15 tests

bench: setup
	$(PY) benchmarks/ppo_iteration.py

# What only a GPU can show (bf16 speed, NCCL on every GPU, the sentiment iteration's memory); SKIPPED without CUDA.
gpu-check: setup
	$(PY) benchmarks/gpu_check.py

clean-venv:
	rm -rf $(VENV)
