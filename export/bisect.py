"""Find the first layer where a deployed model stops agreeing with its source.

ONNX backends (`bisect_onnx`): intermediate tensors become extra graph outputs. ONNX Runtime with graph
optimisations off runs that graph as the reference; the failing backend is ONNX Runtime with optimisations on,
OpenVINO on the same graph (compiled as the runtime compiles it), or the .mnn artifact itself with its internal
tensors read by their ONNX names (the file as shipped, so a conversion flag or a corrupt weight shows up exactly
where it acts). Tensors are compared in topological order with max|d| / max|ref|. Large graphs are searched
k-ary over the topological index: probes spread evenly, then the interval between the last agreeing and the
first diverging probe, so the cost stays a few runs.

PyTorch inference form (`bisect_torch`): forward hooks on modules present under the same name in both forms.
"""
from __future__ import annotations

import io
import time

import numpy as np

from models.metrics import max_rel
from runtime.engines import import_openvino, mnn_runtime_manager, openvino_config, stdout_silenced

ONSET_FRACTION = 0.1  # "onset" = the first probe whose error exceeds this fraction of the gate


def probe_candidates(model) -> list[dict]:
    """Float tensors computed from the input, one per node output, in topological order (the ONNX spec keeps
    nodes sorted). Constant-only subgraphs and non-float tensors (shapes, indices) are skipped."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.output, *graph.input)}
    constant = {init.name for init in graph.initializer}
    out = []
    for index, node in enumerate(graph.node):
        if node.op_type == "Constant" or all(i in constant or not i for i in node.input):
            constant.update(node.output)
            continue
        for name in node.output:
            if name and types.get(name) == onnx.TensorProto.FLOAT:
                out.append({"tensor": name, "node": node.name or name, "op_type": node.op_type,
                            "index": index})
    return out


def with_outputs(model, names: list[str]):
    """A copy of `model` whose graph also outputs `names` (typed from shape inference)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    infos = {v.name: v for v in inferred.graph.value_info}
    existing = {o.name for o in inferred.graph.output}
    for name in names:
        if name not in existing:
            inferred.graph.output.append(infos.get(name) or onnx.helper.make_empty_tensor_value_info(name))
    return inferred


def _upstream_ops(model, tensor: str, depth: int = 3) -> list[str]:
    """Op types of the producers of `tensor` up to `depth` hops back, nearest first: the failing node's
    neighbourhood (e.g. Mul ← Add ← Erf ← Div marks an erf-GELU)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    frontier, ops, seen = [tensor], [], set()
    for _ in range(depth + 1):
        nxt = []
        for t in frontier:
            node = producer.get(t)
            if node is None or id(node) in seen or node.op_type == "Constant":
                continue
            seen.add(id(node))
            ops.append(node.op_type)
            nxt.extend(node.input)
        frontier = nxt
    return ops


def _ort_run(model_bytes: bytes, input_name, xs, names, optimize: bool) -> dict:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    sess = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    runs = [sess.run(names, {input_name: x[None]}) for x in xs]
    return {n: np.concatenate([r[i] for r in runs]) for i, n in enumerate(names)}


def _openvino_run(model_bytes: bytes, input_name, xs, names, precision: str) -> dict:
    """The probe graph under OpenVINO's CPU plugin, configured as the runtime's OpenVinoEngine (1 thread)."""
    ov = import_openvino()
    frontend = ov.frontend.FrontEndManager().load_by_framework("onnx")
    core = ov.Core()
    compiled = core.compile_model(frontend.convert(frontend.load(io.BytesIO(model_bytes))), "CPU",
                                  openvino_config(core, 1, precision))
    request = compiled.create_infer_request()
    runs = []
    for x in xs:
        request.infer({input_name: np.ascontiguousarray(x[None])})
        runs.append([request.get_tensor(n).data.copy() for n in names])
    return {n: np.concatenate([r[i] for r in runs]) for i, n in enumerate(names)}


def mnn_tensor_ops(mnn_path) -> dict[str, str]:
    """Tensor name → MNN op type (e.g. 'GELU_STANDARD', 'Convolution') of every tensor in an .mnn file."""
    with stdout_silenced():
        import MNN

        return {name: var.op_type for name, var in MNN.expr.load_as_dict(str(mnn_path)).items()}


def _mnn_run(mnn_path, input_name, xs, names, precision: str) -> dict:
    """Run the .mnn file itself, reading internal tensors by name: the artifact is probed as shipped."""
    with stdout_silenced():
        import MNN

        rt = mnn_runtime_manager(precision=precision)  # the runtime's settings: probe what it runs
        module = MNN.nn.load_module_from_file(str(mnn_path), [input_name], names, runtime_manager=rt)
    per_name = {n: [] for n in names}
    for x in xs:
        x = np.ascontiguousarray(x[None], np.float32)
        outs = module.forward([MNN.expr.const(x, list(x.shape), MNN.expr.NCHW)])
        for n, o in zip(names, outs):
            if o.data_format != MNN.expr.NCHW:
                o = MNN.expr.convert(o, MNN.expr.NCHW)
            per_name[n].append(np.array(o.read(), dtype=np.float32).reshape(o.shape))
    return {n: np.concatenate(v) for n, v in per_name.items()}


def bisect_onnx(onnx_path, xs: np.ndarray, target, gate: float, artifact=None, max_probes: int = 256,
                time_budget: float = 300.0) -> dict:
    """First ONNX node whose output, as computed by `target` (an export.targets.Target), differs from ONNX
    Runtime (graph optimisations off, same graph) by more than `gate` (max_rel) on the samples `xs` (N,3,H,W).

    An onnxruntime target: ONNX Runtime with all graph optimisations on, on the `artifact` graph; an openvino
    target: OpenVINO's CPU plugin on the same graph. An MNN target:
    the .mnn `artifact` itself at the target's precision, its internal tensors read by their ONNX names
    (tensors the converter fused away are not probed).
    Returns {"found", "node", "op_type", "tensor", "index", "max_rel", "upstream_ops", "mnn_op", "previous",
    "probed", "rounds", "seconds", "note"}; "previous" is the last agreeing probe before the node."""
    import onnx

    start = time.monotonic()
    model = onnx.load(str(onnx_path))
    input_name = model.graph.input[0].name
    cands = probe_candidates(model)
    mnn_ops = {}
    backend, on_mnn = target.name, target.engine == "mnn"
    if on_mnn:
        mnn_ops = mnn_tensor_ops(artifact)
        cands = [c for c in cands if c["tensor"] in mnn_ops]
    xs = np.ascontiguousarray(xs, np.float32)
    result = {"backend": backend, "gate": gate, "found": False, "candidates": len(cands), "probed": 0,
              "rounds": 0, "reference": "onnxruntime with graph optimisations off, on the same ONNX graph"}

    def measure(idx: list[int]) -> dict[int, float]:
        names = [cands[i]["tensor"] for i in idx]
        graph = with_outputs(model, names).SerializeToString()
        ref = _ort_run(graph, input_name, xs, names, optimize=False)
        if on_mnn:
            got = _mnn_run(artifact, input_name, xs, names, target.precision)
        elif target.engine == "openvino":
            got = _openvino_run(graph, input_name, xs, names, target.precision)
        else:
            got = _ort_run(graph, input_name, xs, names, optimize=True)
        return {i: max_rel(ref[n], got[n]) for i, n in zip(idx, names) if ref[n].shape == got[n].shape}

    lo, hi = -1, len(cands)  # cands[lo] agrees (-1: the input), cands[hi] diverges (len: none seen yet)
    errors: dict[int, float] = {}
    while hi - lo > 1:
        if time.monotonic() - start > time_budget:
            result["note"] = f"time budget {time_budget:.0f}s spent before the interval narrowed to one node"
            break
        inside = list(range(lo + 1, hi))
        complete = len(inside) <= max_probes
        if not complete:
            inside = sorted({inside[int(round(i))] for i in np.linspace(0, len(inside) - 1, max_probes)})
        measured = measure(inside)
        result["rounds"] += 1
        result["probed"] += len(measured)
        errors.update(measured)
        first_bad = next((i for i in sorted(measured) if not measured[i] <= gate), None)
        if first_bad is None:
            break
        lo = max((i for i in measured if i < first_bad), default=lo)
        hi = first_bad
        if complete:
            break
    if hi < len(cands):
        c = cands[hi]
        result.update(found=True, node=c["node"], op_type=c["op_type"], tensor=c["tensor"], index=c["index"],
                      max_rel=errors.get(hi), upstream_ops=_upstream_ops(model, c["tensor"]))
        if mnn_ops:
            result["mnn_op"] = mnn_ops[c["tensor"]]
        if lo >= 0:
            p = cands[lo]
            result["previous"] = {"node": p["node"], "op_type": p["op_type"], "max_rel": errors.get(lo)}
        # A cause just under the gate (tanh-GELU: ~1e-4) only crosses it a layer later: name where it began.
        first = next((i for i in sorted(errors) if i < hi and not errors[i] <= gate * ONSET_FRACTION), None)
        if first is not None:
            o = cands[first]
            result["onset"] = {"node": o["node"], "op_type": o["op_type"], "max_rel": errors[first],
                               "upstream_ops": _upstream_ops(model, o["tensor"])}
    elif "note" not in result:
        result["note"] = ("no probed tensor diverges from the ONNX reference: the ONNX graph itself differs "
                          "from PyTorch (an export or inference-form problem)")
    result["seconds"] = round(time.monotonic() - start, 2)
    return result


def _record(model, x):
    """Run `model` on x with hooks on every submodule: (execution order, outputs, BatchNorm name → name of the
    innermost module that produced its input)."""
    import torch

    order, outputs, live, producer_of, bn_inputs, handles = [], {}, [], {}, {}, []

    def hook(name):
        def fn(module, args, out):
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and args:
                src = producer_of.get(id(args[0]))
                if src is not None:
                    bn_inputs[name] = src
            if isinstance(out, torch.Tensor):
                live.append(out)  # keeps ids unique while the forward runs
                producer_of.setdefault(id(out), name)  # a parent returning its child's tensor keeps the child
                order.append(name)
                outputs[name] = out.detach().clone()
        return fn

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return order, outputs, bn_inputs


def _rewritten(ref_module, inf_module) -> bool:
    """A leaf whose parameters the inference transform changed (a fold): its output means something else."""
    import torch

    if inf_module is None or any(True for _ in ref_module.children()):
        return False
    rp = dict(ref_module.named_parameters(recurse=False))
    ip = dict(inf_module.named_parameters(recurse=False))
    if not ip:  # replaced by a parameter-free module (a folded BatchNorm → Identity): not a rewrite
        return False
    if rp.keys() != ip.keys():
        return True
    return any(rp[k].numel() != ip[k].numel()
               or not torch.equal(rp[k].detach().reshape(-1), ip[k].detach().reshape(-1)) for k in rp)


def bisect_torch(reference, inference, xs: np.ndarray, gate: float) -> dict:
    """First module, in execution order, whose output in the inference form differs from the training form
    by more than `gate` (max_rel), among modules with the same name and output shape in both forms.

    Folding changes what some tensors mean, so those are not compared: leaves whose parameters the transform
    rewrote (a conv with a BatchNorm or layer scale folded in), and BatchNorms folded into the next layer.
    A BatchNorm folded into the conv before it is compared (in the inference form its output is that conv's
    output) and, when it diverges, the conv is reported."""
    import torch
    from torch.nn.modules.batchnorm import _BatchNorm

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = torch.from_numpy(np.ascontiguousarray(xs, np.float32))
        order, ref_out, bn_inputs = _record(reference.eval(), x)
        _, inf_out, _ = _record(inference.eval(), x)
    finally:
        torch.set_num_threads(threads)
    ref_modules, inf_modules = dict(reference.named_modules()), dict(inference.named_modules())
    rewritten = {n for n in order if _rewritten(ref_modules[n], inf_modules.get(n))}
    folded_after = {}  # folded BatchNorm → the conv it was folded into
    skip = set(rewritten)
    for bn, src in bn_inputs.items():
        if not isinstance(inf_modules.get(bn), _BatchNorm):
            if src in rewritten:
                folded_after[bn] = src
            else:
                skip.add(bn)
    previous, compared = None, 0
    for name in order:
        if name in skip or name not in inf_out or inf_out[name].shape != ref_out[name].shape:
            continue
        compared += 1
        err = max_rel(ref_out[name].numpy(), inf_out[name].numpy())
        if err <= gate:
            previous = {"module": name, "max_rel": err}
            continue
        module = folded_after.get(name, name)
        result = {"found": True, "module": module, "max_rel": err, "gate": gate, "compared": compared,
                  "reference_type": type(ref_modules[module]).__name__,
                  "inference_type": type(inf_modules[module]).__name__, "previous": previous}
        if name in folded_after:
            result["folded_batchnorm"] = name
        return result
    return {"found": False, "gate": gate, "compared": compared,
            "note": "no module aligned by name diverges: the difference is in code the forms do not share"}
