# Two commands set up and use a fresh machine (see README.md):
#   make quickstart   venv + install + the main job on the embedded model
#   make test         venv + install + the test suite (SLOW=1 or CI=true adds the learning runs)
# Both are idempotent: the install runs again only when pyproject.toml changes.

VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.tether-installed
PYTEST_ARGS ?=

.PHONY: setup quickstart test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first and alone: this picks the machine's local CPU wheel (anything else pulls CUDA builds)
	$(PY) -m pip install --disable-pip-version-check -q torch==2.13.0
	$(PY) -m pip install --disable-pip-version-check -q -e ".[dev]" torch==2.13.0
	touch $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/tether quickstart

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
