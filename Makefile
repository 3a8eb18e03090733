# Two commands do all the set-up on a fresh machine with only Python:
#   make serve   install into .venv and start the web UI on the shipped models
#   make test    install what the tests need (incl. Debian's chromium) and run the whole suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is taken as a range (>=2.11, see pyproject.toml). On x86-64 Linux with the CPU-only machines of this
# project, pip takes the wheel lying on disk; elsewhere pip picks the newest release it may.
PIP := $(BIN)/python -m pip

.PHONY: install install-test serve test doctor clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# The web UI on the shipped models, on this machine only (HOST=0.0.0.0 to expose it); prints the URL.
HOST ?= 127.0.0.1
PORT ?= 7860
serve: install
	$(BIN)/ditstudio serve --host $(HOST) --port $(PORT)

doctor: install
	$(BIN)/ditstudio doctor

# Browser tests drive Debian's chromium through Playwright; install it when missing (needs root/apt).
.PHONY: chromium
chromium:
	@command -v chromium >/dev/null 2>&1 || { (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 || echo "warning: could not install chromium; browser tests will be skipped"; }

test: install-test chromium
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
