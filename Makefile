# Two commands on a fresh machine:  make app   and   make test
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# torch==2.13.0 resolves to the CPU build on this project's machines; an
# unpinned torch would pull several GB of CUDA wheels.
TORCH  ?= torch==2.13.0
EXTRAS ?= test,dev

.PHONY: install app test test-fast lint bench info notebooks notebooks-html browser clean

$(VENV)/.installed-$(EXTRAS): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH)"
	$(PIP) install --quiet -e ".[$(EXTRAS)]" "$(TORCH)"
	touch $@

install: $(VENV)/.installed-$(EXTRAS)

# The app on the shipped nano, bound to 127.0.0.1:7860 (qtg app --help for options).
app:
	$(MAKE) install EXTRAS=app
	$(VENV)/bin/qtg app

# JupyterLab on notebooks/ (the notebooks extra brings jupyterlab).
notebooks:
	$(MAKE) install EXTRAS=notebooks
	$(VENV)/bin/jupyter lab notebooks/

# Execute every notebook and write HTML whose figures draw offline (plotly.js inline once per page)
# to build/notebooks-html/; the committed notebooks stay without outputs.
notebooks-html:
	$(MAKE) install EXTRAS=notebooks
	OMP_NUM_THREADS=1 $(PY) notebooks/export_html.py --out build/notebooks-html

# Debian's Chromium for the browser tests (playwright cannot download browsers here).
browser:
	command -v chromium >/dev/null || (apt-get install -y chromium || (apt-get update && apt-get install -y chromium))

test: install
	$(PY) -m pytest -q --durations=15

test-fast: install
	$(PY) -m pytest -q -m "not slow"

# Every Python file the project ships: the library, the app, the benchmarks and the tests.
lint: install
	$(VENV)/bin/ruff check qtg app benchmarks tests

bench: install
	$(PY) benchmarks/bench_attention.py

info: install
	$(VENV)/bin/qtg info

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
