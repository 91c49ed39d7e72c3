# edgeport: `make export` and `make test` are all a fresh machine needs.
PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.edgeport-installed
MODEL   ?= fasternet_t0
WEIGHTS ?=
OUT     ?= artifacts
EXPORT_ARGS ?=
PYTEST_ARGS ?=
SMALL_MODELS := fasternet_t0 convnext_atto inception_next_atto efficientnetv2_s

.PHONY: setup test test-slow lint export export-all parity bench bench-full arm-setup arm arm-cost clean

setup: $(STAMP)

# Re-installs only when the dependency files change; the stamp makes a no-op run take well under a second.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[export,runtime,dev]'
	@touch $@

# pytest exits 5 when it collects nothing; that is not a failure of the suite.
test: setup
	$(PY) -m pytest -q -m "not slow and not arm" $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

test-slow: setup
	$(PY) -m pytest -q -m "slow" $(PYTEST_ARGS); rc=$$?; [ $$rc -eq 5 ] && exit 0; exit $$rc

lint: setup
	$(PY) -m ruff check models export runtime benchmarks tests

export: setup
	$(PY) -m export $(MODEL) $(if $(WEIGHTS),--weights $(WEIGHTS)) --out $(OUT) $(EXPORT_ARGS)

export-all: setup
	@for m in $(SMALL_MODELS); do $(PY) -m export $$m --out $(OUT) $(EXPORT_ARGS) || exit $$?; done

clean:
	rm -rf $(OUT) .pytest_cache .ruff_cache
