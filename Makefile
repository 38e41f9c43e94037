# Moxy: the two commands are `make run` and `make test`; everything else is a helper.
VENV    ?= .venv
PYTHON  ?= python3
BIN     := $(VENV)/bin
STATE   ?= var

.DEFAULT_GOAL := help
.PHONY: help run test check lint bench soak example clean system-deps
.PHONY: image-check lock

help:
	@echo "make run     install into $(VENV) and start Moxy on 127.0.0.1:8080 (key kept in $(STATE)/moxy.key)"
	@echo "make clean   remove the venv, caches and $(STATE)/cache; $(STATE)/moxy.key is kept"
	@echo "make test    install with test extras and run the whole suite (unit + real servers on loopback)"
	@echo "make check   ruff, ruff format --check, mypy --strict, import layering"
	@echo "make bench   the benchmark, as ratios against nginx measured in the same run"
	@echo "make soak    SOAK_MINUTES (default 10) of mixed traffic on 2 workers: RSS, fds and 5xx causes, verdict"
	@echo "make example the Jinja2 example page of signed images"
	@echo "make image-check  the Dockerfile's facts and its install/run steps, replayed in a venv (no engine needed)"
	@echo "make lock    regenerate deploy/requirements.txt, the image's hash-pinned dependencies"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[redis,jinja2]'
	@touch $@

$(VENV)/.test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $@ $(VENV)/.runtime

# Absolute paths, so the banner's `MOXY_KEY_FILE=... moxy sign` line works from any folder.
run: $(VENV)/.runtime
	@mkdir -p $(STATE)
	MOXY_KEY_FILE=$${MOXY_KEY_FILE:-$(abspath $(STATE))/moxy.key} \
	MOXY_CACHE_DIR=$${MOXY_CACHE_DIR:-$(abspath $(STATE))/cache} \
		$(BIN)/moxy serve --init-key

system-deps:
	@bash .ci/system-deps

test: $(VENV)/.test system-deps
	$(BIN)/python -m pytest

check: $(VENV)/.test
	$(BIN)/ruff check moxy tests bench examples
	$(BIN)/ruff format --check moxy tests bench examples
	$(BIN)/mypy
	$(BIN)/lint-imports

lint: $(VENV)/.test
	$(BIN)/ruff format moxy tests bench examples
	$(BIN)/ruff check --fix moxy tests bench examples

bench: $(VENV)/.test system-deps
	$(BIN)/python -m bench

SOAK_MINUTES ?= 10
soak: $(VENV)/.test system-deps
	$(BIN)/python -m bench.soak --minutes $(SOAK_MINUTES)

example: $(VENV)/.runtime
	$(BIN)/python examples/app.py

# Everything but $(STATE)/moxy.key: every URL signed by `make run` depends on it, so it goes only by hand.
clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis .coverage* build dist *.egg-info
	@if [ -d $(STATE) ]; then find $(STATE) -mindepth 1 -maxdepth 1 ! -name moxy.key -exec rm -rf {} +; fi
	@if [ -e $(STATE)/moxy.key ]; then \
		echo "kept $(STATE)/moxy.key: the URLs signed with it stop working without it (rm it yourself to retire it)"; \
	fi

# The container image without a container engine: the Dockerfile's facts, and its install and run steps replayed
# in a fresh venv (tests/integration/test_image.py). `docker build -t moxy .` where an engine runs.
image-check: $(VENV)/.test
	$(BIN)/python -m pytest -q tests/integration/test_image.py

# deploy/requirements.txt, the image's lock: every runtime dependency of moxy[redis], pinned, with hashes.
lock: $(VENV)/.test
	$(BIN)/python -m pip install --quiet pip-tools
	CUSTOM_COMPILE_COMMAND="make lock" $(BIN)/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras \
		--no-emit-index-url --no-emit-find-links --extra redis --output-file deploy/requirements.txt pyproject.toml
