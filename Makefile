# edgeport: `make export` and `make test` are all a fresh machine needs.
PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.edgeport-installed
MODEL   ?= fasternet_t0
WEIGHTS ?=
DEVICE  ?=
OUT     ?= artifacts
EXPORT_ARGS ?=
PYTEST_ARGS ?=
PARITY_ARGS ?=
BENCH_ARGS ?=
SMALL_MODELS := fasternet_t0 convnext_atto inception_next_atto efficientnetv2_s

.PHONY: setup test test-slow lint export export-all bundle parity bench bench-full docs clean

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

# DEVICE=board.json: the form the board measured fastest (edgeport-bench --json), instead of this host's choice.
export: setup
	$(PY) -m export $(MODEL) $(if $(WEIGHTS),--weights $(WEIGHTS)) $(if $(DEVICE),--device $(DEVICE)) --out $(OUT) $(EXPORT_ARGS)

# Every inference form of MODEL, gated, packed for the board: OUT/MODEL/bundle.json, OUT/MODEL.bundle.tar.gz
bundle: setup
	$(PY) -m export $(MODEL) --bundle $(if $(WEIGHTS),--weights $(WEIGHTS)) --out $(OUT) $(EXPORT_ARGS)

# Carries on past a model whose parity gate fails, and exits with the failure at the end.
export-all: setup
	@rc=0; for m in $(SMALL_MODELS); do $(PY) -m export $$m --out $(OUT) $(EXPORT_ARGS) || rc=$$?; done; exit $$rc

# Re-runs the parity suite on every export of MODEL found under OUT.
parity: setup
	@set -e; found=0; for d in $(OUT)/$(MODEL)/*/; do [ -f "$$d/manifest.json" ] || continue; found=1; \
	  $(PY) -m export.parity "$$d" $(PARITY_ARGS); done; \
	  [ $$found = 1 ] || { echo "no export of $(MODEL) under $(OUT)/; run make export MODEL=$(MODEL)" >&2; exit 2; }

# Latency of every classifier form vs the fc baseline, MNN GELU profile, operator table, roofline, seed checks
# -> benchmarks/results/ (minutes; docs/measurements/forms.md says how long).
bench: setup
	$(PY) -m benchmarks $(BENCH_ARGS)

# Also the detectors' backbone forms at 640² and the fp32/fp16/int8 files beside their gates (about an hour on a
# first run of a 2-core machine; the export cache makes re-runs shorter). Every variant: BENCH_ARGS="--models all".
bench-full: setup
	$(PY) -m benchmarks --full $(BENCH_ARGS)

# The documentation site, offline, into site/: the command reference is generated from the argparse parsers and
# the target registry at build time (docs/hooks.py); any warning (a broken link or anchor) fails the build.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

include benchmarks/arm/arm.mk
include benchmarks/arm/board.mk
include benchmarks/debian13/debian13.mk
include tests/ultralytics/ultralytics.mk

clean:
	rm -rf $(OUT) .pytest_cache .ruff_cache
