# Two commands do everything on a fresh machine (Python 3.11+, network to PyPI):
#   make demo   offline grounding demo: tiny Qwen2-VL + synthetic data, train through llamafactory-cli, evaluate
#   make test   the test suite (CPU, offline)
# Both create .venv with the pinned stack and the package (editable) on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install browser demo test clean

$(STAMP): setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	$(MAKE) browser
	touch $(STAMP)

install: $(STAMP)

# Chromium for the LLaMA Board browser tests (Playwright drives the system browser; `playwright install` is not
# used). Installed with apt-get when running as root; elsewhere the command to run is printed and those tests skip.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else echo "chromium not found: run 'sudo apt-get install chromium' for the browser tests"; fi; }

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/llamafactory-vision demo --out out/demo

# Two workers, each test file on one of them (module fixtures such as a training run are built once)
test: $(STAMP) browser
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n 2 --dist loadfile --durations=25

clean:
	rm -rf out .pytest_cache
