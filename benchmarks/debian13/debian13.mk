# Today's boards without a board (include from the top Makefile): Debian 13 (glibc 2.41, CPython 3.13) userlands,
# x86_64 run natively through trixie's own loader and aarch64 under qemu-user, with the cp313 wheels.
#   make debian13-setup        sysroots + wheels under $(DEBIAN13_CACHE) (network, once: ~60 MB of .debs, ~130 MB of wheels)
#   make debian13              bare `import MNN`, torch-free checks, runtime.infer fp32/fp16 top-1 vs the host,
#                              the edgeport-runtime wheel alone, runtime_bench --n 50; report in $(DEBIAN13_CACHE)/report.json
DEBIAN13_CACHE ?= .cache/debian13
DEBIAN13_MODEL ?= fasternet_t0
DEBIAN13_ARGS  ?=

.PHONY: debian13-setup debian13 debian13-ci

debian13-setup: setup
	bash benchmarks/debian13/setup.sh $(DEBIAN13_CACHE) $(PY)

# Uses the first export of DEBIAN13_MODEL under OUT that has an fp16 file; exports one when there is none.
debian13: debian13-setup
	@d=$$(ls -d $(OUT)/$(DEBIAN13_MODEL)/*/model.fp16.mnn 2>/dev/null | head -1); \
	  if [ -z "$$d" ]; then $(PY) -m export $(DEBIAN13_MODEL) --out $(OUT) || exit $$?; \
	    d=$$(ls -d $(OUT)/$(DEBIAN13_MODEL)/*/model.fp16.mnn | head -1); fi; \
	  $(PY) -m benchmarks.debian13.run --cache $(DEBIAN13_CACHE) $$(dirname $$d) $(DEBIAN13_ARGS)

# CI: x86_64 only (the glibc 2.41 refusal is x86_64's: MNN's aarch64 wheel has a non-executable stack) and the
# unit tests of the fallback.
debian13-ci: DEBIAN13_ARGS += --arch amd64
debian13-ci: debian13
	$(PY) -m pytest -q tests/test_mnn_import.py -m "not slow"
