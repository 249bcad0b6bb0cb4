# `make test` and `make demo` do their own set-up: a .venv with the pinned stack and the package.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= test,onnx,hf,loggers
STAMP := $(VENV)/.installed-$(EXTRAS)

.PHONY: setup test demo clean

setup: $(STAMP)

$(STAMP): requirements.txt constraints.txt setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip setuptools wheel -q
	$(PY) -m pip install -c constraints.txt -e ".[$(EXTRAS)]"
	@touch $@

test: setup
	$(PY) -m pytest tests -q

demo: setup
	$(VENV)/bin/dfine train -c configs/dfine_n_demo.yml

clean:
	rm -rf $(VENV) build *.egg-info
