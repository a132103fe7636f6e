# Two commands do everything on a fresh machine (Python 3.11+, network to PyPI):
#   make demo   offline grounding demo: tiny Qwen2-VL + synthetic data, train through llamafactory-cli, evaluate
#   make test   the test suite (CPU, offline)
# Both create .venv with the pinned stack and the package (editable) on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test clean

$(STAMP): setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/llamafactory-vision demo --out out/demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

clean:
	rm -rf out .pytest_cache
