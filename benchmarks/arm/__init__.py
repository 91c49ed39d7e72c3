"""ARM without a board: MNN's and onnxruntime's aarch64 kernels under qemu-user, for parity (fp32, fp16, int8)
and instruction counts.

`make arm-setup` builds the environment under .cache/arm/; see benchmarks/arm/setup.sh."""
from .run import arm_env, count_instructions, guest_infer, run_mnn_arm, versions

__all__ = ["arm_env", "count_instructions", "guest_infer", "run_mnn_arm", "versions"]
