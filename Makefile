# `make test` and `make demo` work from a fresh clone: each creates .venv if missing and installs the project into it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test lint demo lab bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev,notebooks]" 2>&1 | grep -v "is ignored: it is neither" || true
	$(PY) -c "import torch, torchvision, timm, nbclient, se_surgery, analysis"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check se_surgery analysis tests benchmarks

demo: $(STAMP)
	$(PY) -m se_surgery.describe resnet50
	# --resume auto: a rerun continues (or, once finished, just reports) runs/demo instead of refusing it
	$(PY) -m se_surgery.train --out runs/demo --resume auto
	$(PY) -m analysis.excitations --ckpt runs/demo/best.pt --per-class 50 --ablate last-stage

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

bench: $(STAMP)
	$(PY) benchmarks/surgery.py
	$(PY) benchmarks/train.py
	$(PY) benchmarks/excitations.py

clean:
	rm -rf $(VENV) runs .pytest_cache
