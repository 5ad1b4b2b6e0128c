# Two commands on a fresh machine:  make app   and   make test
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# torch==2.13.0 resolves to the CPU build on this project's machines; an
# unpinned torch would pull several GB of CUDA wheels.
TORCH  ?= torch==2.13.0
EXTRAS ?= test,dev

.PHONY: install app test test-fast lint bench info clean

$(VENV)/.installed-$(EXTRAS): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH)"
	$(PIP) install --quiet -e ".[$(EXTRAS)]" "$(TORCH)"
	touch $@

install: $(VENV)/.installed-$(EXTRAS)

app: install
	@echo "The Gradio app is not built yet (issue: 'The QTG Explorer web app'). Meanwhile:"
	$(VENV)/bin/qtg info

test: install
	$(PY) -m pytest -q --durations=15

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check qtg tests benchmarks

bench: install
	$(PY) benchmarks/bench_attention.py

info: install
	$(VENV)/bin/qtg info

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
