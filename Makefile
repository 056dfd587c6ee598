# Two commands a newcomer needs: `make demo` and `make test`. Each builds .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# The FHIR server the connector tests talk to, in its own virtualenv (its pins must not meet ours).
SEKMET_VERSION := 0.1.1
SEKMET_VENV := .venv-sekmet
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: demo test test-slow lint docs bench clean $(SEKMET_VENV)

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

$(SEKMET_VENV): $(SEKMET_VENV)/bin/.installed-$(SEKMET_VERSION)

$(SEKMET_VENV)/bin/.installed-$(SEKMET_VERSION):
	$(PYTHON) -m venv $(SEKMET_VENV)
	$(SEKMET_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(SEKMET_VENV)/bin/python -m pip install --quiet sekmet-fhir==$(SEKMET_VERSION)
	touch $@

demo: $(BIN)/.installed
	$(BIN)/twinhub demo

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The manual: its generated pages up to date, then the site, offline and strict (into site/).
# NO_MKDOCS_2_WARNING quiets the banner material 9.x prints on every build (its end of life).
docs: $(BIN)/.installed
	$(BIN)/python docs/generate.py --check
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

# The default run skips the tests marked slow (about 9 minutes on 2 cores); CI runs both.
test: lint docs $(SEKMET_VENV)
	TWINHUB_REQUIRE_SEKMET=1 $(BIN)/pytest -m "not slow"

test-slow: $(BIN)/.installed $(SEKMET_VENV)
	TWINHUB_REQUIRE_SEKMET=1 $(BIN)/pytest -m slow

bench: $(BIN)/.installed $(SEKMET_VENV)
	$(BIN)/python bench/land_bulk.py
	$(BIN)/python bench/ehr_bulk.py

clean:
	rm -rf $(VENV) $(SEKMET_VENV) site .pytest_cache .mypy_cache .ruff_cache
	@echo "kept the stores (.twinhub, twinhub-demo/): delete them yourself if you mean to"
