# Two entry points from a fresh clone: `make demo` and `make test`.
# Both create .venv, install flashtile into it, and run on whatever device is present
# (GPU through Triton, or CPU through the tiled PyTorch path and Triton's interpreter).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch 2.13.0 is used when no torch is importable; an existing torch is kept.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test venv bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q "triton==3.6.*" "numpy<2.4"
	$(PY) -m pip install -q -e ".[test,bench]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m flashtile info
	$(PY) -m flashtile verify
	$(PY) examples/quickstart.py

test: venv
	$(PY) -m pytest -q tests

bench: venv
	$(PY) -m flashtile bench --suite standard

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
