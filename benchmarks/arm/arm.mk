# ARM without a board (include from the top Makefile): MNN's aarch64 kernels under qemu-user.
#   make arm-setup                      aarch64 CPython + MNN + TCG plugin under $(ARM_CACHE) (network, once)
#   make arm  [ARM_DIRS="artifacts/m/tag ..."] [ARM_ARGS='--gates {"mnn_low": {"max_rel": 1e-2}}']      parity, judged as on the host
#   make arm-cost [ARM_MODELS="artifacts/m ..."] [ARM_COST_ARGS=...]               instruction counts
#     int8 against fp16 (export with --targets including mnn_int8, mnn_fp16w):
#       ARM_COST_ARGS="--configs neoverse-n1:mnn_int8 neoverse-n1:mnn_fp16w_low neoverse-n1:mnn_low"
#     a detector's baseline form only: ARM_MODELS=artifacts/yolo11n_fasternet_t0 ARM_COST_ARGS="--variants split_cat-fc"
ARM_CACHE     ?= .cache/arm
ARM_DIRS      ?=
ARM_ARGS      ?=
ARM_MODELS    ?=
ARM_COST_ARGS ?=

.PHONY: arm-setup arm arm-cost

arm-setup: setup
	bash benchmarks/arm/setup.sh $(ARM_CACHE) $(PY)

arm: arm-setup
	$(PY) -m benchmarks.arm.parity --cache $(ARM_CACHE) $(ARM_DIRS) $(ARM_ARGS)

arm-cost: arm-setup
	$(PY) -m benchmarks.arm.cost --cache $(ARM_CACHE) $(ARM_MODELS) $(ARM_COST_ARGS)

# CI's ARM check: export the two GELU models, run the fp32 (cortex-a53) and fp16 (neoverse-n1, precision low)
# parity matrix under emulation, then the @arm tests.
ARM_CI_MODELS ?= fasternet_t0 convnext_atto
.PHONY: arm-ci
arm-ci: arm-setup
	@for m in $(ARM_CI_MODELS); do $(PY) -m export $$m --out $(OUT) || exit $$?; done
	$(PY) -m benchmarks.arm.parity --cache $(ARM_CACHE) --quick $(foreach m,$(ARM_CI_MODELS),$(OUT)/$(m)/*/)
	$(PY) -m pytest -q -m arm tests/test_arm.py
