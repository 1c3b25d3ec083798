# Two entry points, each setting up what it needs in a local virtual environment:
#   make demo   trains dense vs DropBack vs Procrustes on scikit-learn's digits
#   make test   runs the whole test suite (Triton kernels through the CPU interpreter)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch is enough here; any torch >= 2.4 works (set TORCH_SPEC to choose).
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test install clean

$(VENV)/.installed: setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m procrustes_kernels.demo $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest tests -q $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info demo_out
