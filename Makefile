# imcap: `make demo` runs the main job on the built-in shapes dataset, `make test` the test suite.
# Both create the virtual environment .venv on first use and reuse it afterwards.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-requirements

.PHONY: install demo test lint clean-demo

# Re-installs only when requirements.txt changes. torch first, pinned to the release that pip takes
# from this machine's disk; on other machines it is an ordinary download.
$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python demo.py

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest tests

lint: $(STAMP)
	$(BIN)/ruff check .

clean-demo:
	rm -rf data/raw/shapes data/processed/shapes model_files/shapes
