# Helios: the two commands that matter are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CKPT   := checkpoints/tiny

.PHONY: setup demo test clean

setup: $(VENV)/.installed $(CKPT)/model_index.json

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

$(CKPT)/model_index.json: $(VENV)/.installed
	$(VENV)/bin/helios init --config tiny --out $(CKPT) --seed 0

demo: setup
	$(VENV)/bin/helios generate --prompt "a red circle moving left on a dark background" \
		--duration 4 --seed 0 --output out.mp4

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) checkpoints out.mp4
