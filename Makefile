# Two commands a user needs: `make demo` and `make test`. Each installs what it needs.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade "pip>=24" wheel
	$(BIN)/pip install -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/vqtok demo

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=12

lint: $(STAMP)
	$(BIN)/ruff check vqcore pipelines tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache
