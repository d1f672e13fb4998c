# Developer shortcuts.  `make docs` after any change to what the tool prints.
PYTHON ?= python

.PHONY: docs docs-check test lint

docs:  ## rerun the README's marked examples and rewrite README.md and docs/img
	$(PYTHON) tools/make_docs.py

docs-check:  ## fail when the README's examples differ from the tool's output
	$(PYTHON) tools/make_docs.py --check

test:
	$(PYTHON) -m pytest -q

lint:
	$(PYTHON) -m ruff check ttcsim tests bench tools
