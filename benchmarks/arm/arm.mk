# ARM without a board (include from the top Makefile): MNN's and onnxruntime's aarch64 kernels under qemu-user.
#   make arm-setup         aarch64 CPython + MNN + onnxruntime, Debian 12's qemu 7.2 (MNN) and trixie's static
#                          qemu 10 (onnxruntime) under $(ARM_CACHE), and once a qemu 10 with TCG plugins built
#                          from trixie's source (counting; ~15-30 min on 2 cores, then cached)    (network, once)
#   make arm-setup-parity  the same without building qemu: all `make arm` and CI need
#   make arm  [ARM_DIRS="artifacts/m/tag ..."] [ARM_ARGS='--gates {"mnn_low": {"max_rel": 1e-2}}']
#                          parity of every MNN and ONNX file (model.onnx, model.int8.onnx), judged as on the host
#   make arm-cost [ARM_MODELS="artifacts/m ..."] [ARM_COST_ARGS=...]               instruction counts
#     default configs: cortex-a76 (Raspberry Pi 5) ort, mnn_fp32, mnn_fp16w_low; cortex-a72 (Raspberry Pi 4) ort,
#     mnn_fp32.  Graviton2-class: ARM_COST_ARGS="--configs neoverse-n1:ort neoverse-n1:mnn_fp32"
#     int8 against fp16 (export with --targets including mnn_int8, mnn_fp16w):
#       ARM_COST_ARGS="--configs neoverse-n1:mnn_int8 neoverse-n1:mnn_fp16w_low neoverse-n1:mnn_low"
#     a detector's baseline form only: ARM_MODELS=artifacts/yolo11n_fasternet_t0 ARM_COST_ARGS="--variants split_cat-fc"
ARM_CACHE     ?= .cache/arm
ARM_DIRS      ?=
ARM_ARGS      ?=
ARM_MODELS    ?=
ARM_COST_ARGS ?=

.PHONY: arm-setup arm-setup-parity arm arm-cost

arm-setup: setup
	bash benchmarks/arm/setup.sh $(ARM_CACHE) $(PY) --counting

arm-setup-parity: setup
	bash benchmarks/arm/setup.sh $(ARM_CACHE) $(PY)

arm: arm-setup-parity
	$(PY) -m benchmarks.arm.parity --cache $(ARM_CACHE) $(ARM_DIRS) $(ARM_ARGS)

arm-cost: arm-setup
	$(PY) -m benchmarks.arm.cost --cache $(ARM_CACHE) $(ARM_MODELS) $(ARM_COST_ARGS)

# CI's ARM check (no qemu build): export the two GELU models, run the parity matrix under emulation (MNN fp32 on
# cortex-a53, MNN fp16 on neoverse-n1 precision low, model.onnx on cortex-a76 under qemu 10), then the @arm tests.
ARM_CI_MODELS ?= fasternet_t0 convnext_atto
.PHONY: arm-ci
arm-ci: arm-setup-parity arm-board-setup
	@for m in $(ARM_CI_MODELS); do $(PY) -m export $$m --out $(OUT) || exit $$?; done
	$(PY) -m benchmarks.arm.parity --cache $(ARM_CACHE) --quick $(foreach m,$(ARM_CI_MODELS),$(OUT)/$(m)/*/)
	$(PY) -m pytest -q -m arm tests/test_arm.py tests/test_arm_board.py
