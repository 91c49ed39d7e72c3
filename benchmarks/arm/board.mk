# The board bench on an emulated ARM board (include from the top Makefile): edgeport-runtime, installed from
# ./runtime as a wheel with MNN, onnxruntime and OpenVINO's aarch64 wheels, run under qemu-user 10 for a named CPU.
#   make arm-board-setup     msgspec, Pillow, OpenVINO (aarch64 cp311) and the runtime wheel into
#                            $(ARM_CACHE)/board-site; the aarch64 environment itself comes from
#                            `make arm-setup-parity` (sysroot, CPython, MNN, onnxruntime, qemu 10)    (network, once)
#   make arm-bench [BUNDLE=OUT/MODEL.bundle.tar.gz] [ARM_CPU=cortex-a76] [ARM_ROUNDS=3] [ARM_BENCH_JSON=...]
#                  [ARM_BENCH_ARGS="--engines openvino"]  (more edgeport-bench options)
#                            edgeport-bench on the bundle in the guest (made first with `make bundle` when missing);
#                            the JSON says "emulated": true, so `make export DEVICE=...` needs
#                            EXPORT_ARGS=--allow-emulated to choose from it
#   make arm-board-parity ARM_DIRS="OUT/MODEL/FORM ..."   the openvino target judged in the guest, host's gates
#   make arm-board-count ARM_DIRS="OUT/MODEL/FORM ..."    instructions of one inference per engine (ONNX Runtime,
#                            OpenVINO, MNN fp32/low) through the runtime; needs the plugin qemu of `make arm-setup`
ARM_CPU        ?= cortex-a76
ARM_ROUNDS     ?= 3
BUNDLE         ?= $(OUT)/$(MODEL).bundle.tar.gz
ARM_BENCH_JSON ?= $(OUT)/$(MODEL).$(ARM_CPU)-emulated.json
ARM_BENCH_ARGS ?=

.PHONY: arm-board-setup arm-bench arm-board-parity arm-board-count

arm-board-setup: arm-setup-parity
	bash benchmarks/arm/board_setup.sh $(ARM_CACHE) $(PY)

arm-bench: arm-board-setup
	@test -e $(BUNDLE) || $(MAKE) --no-print-directory bundle
	$(PY) -m benchmarks.arm.board --cache $(ARM_CACHE) --cpu $(ARM_CPU) bench $(BUNDLE) --json $(ARM_BENCH_JSON) \
	  --rounds $(ARM_ROUNDS) $(if $(ARM_BENCH_ARGS),-- $(ARM_BENCH_ARGS))

arm-board-parity: arm-board-setup
	$(PY) -m benchmarks.arm.board --cache $(ARM_CACHE) --cpu $(ARM_CPU) parity $(ARM_DIRS)

arm-board-count: arm-board-setup
	$(PY) -m benchmarks.arm.board --cache $(ARM_CACHE) --cpu $(ARM_CPU) count $(ARM_DIRS)
