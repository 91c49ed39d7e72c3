"""runtime/: the torch-free Predictor on tiny artifacts built here (torch → ONNX + metadata → MNN)."""
from __future__ import annotations

import io
import json
import math
import struct
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import runtime
from export.mnn_convert import convert
from runtime.images import load_image
from runtime.preprocess import preprocess

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

SIZE = 32
META = {
    "edgeport_version": "0.1.0", "model": "tiny_cnn", "family": "tiny", "task": "classification",
    "input_name": "input", "input_shape": [-1, 3, SIZE, SIZE], "layout": "NCHW",
    "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "crop_pct": 0.875,
    "interpolation": "bicubic", "num_classes": 10, "output_names": ["logits"], "pconv": None, "mlp": "conv",
    "weights_sha256": None, "precision": "fp32",
}
FEATURE_META = {**META, "model": "tiny_features", "task": "features", "output_names": ["feat_s2", "feat_s4"]}


class TinyFeatures(torch.nn.Module):
    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.stage = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.GELU())

    def forward(self, x):
        f2 = self.stem(x)
        return f2, self.stage(f2)


class TinyClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.features = TinyFeatures()
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.features(x)[1].mean((2, 3)))


def make_photo(w: int, h: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """Smooth random colours plus fine noise: photo-like, so resampling bugs show."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    noise = rng.integers(-20, 21, (h, w, 3))
    pixels = np.clip(np.asarray(coarse, np.int64) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels).convert(mode)


def realistic(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """BN statistics from data and, for a classifier, a head giving logits with std ~3 (random: ~0.02)."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        model.train()(x)
        model.eval()
        if hasattr(model, "head"):
            scale = 3.0 / model(x).std()
            model.head.weight.mul_(scale)
            model.head.bias.mul_(scale)
    return model


def export(model, path, meta: dict, batch: int | None = None) -> None:
    """ONNX with metadata_props["edgeport"] (batch None = dynamic), then MNN with the same JSON as bizCode."""

    names = meta["output_names"]
    dynamic = None if batch else {n: {0: "batch"} for n in ["input", *names]}
    with warnings.catch_warnings():  # the legacy exporter's DeprecationWarning (dynamo needs onnxscript)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, torch.zeros(batch or 1, 3, SIZE, SIZE), str(path), dynamo=False,
                          opset_version=17, input_names=["input"], output_names=names, dynamic_axes=dynamic)
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = "edgeport", json.dumps(meta)
    onnx.save(proto, str(path))
    convert(path, path.with_suffix(".mnn"), json.dumps(meta), log_path=path.with_suffix(".log"))


def build_tiny_artifacts(out_dir) -> SimpleNamespace:
    torch.manual_seed(0)
    x = torch.randn(32, 3, SIZE, SIZE)
    classifier, features = realistic(TinyClassifier(), x), realistic(TinyFeatures(), x)
    export(classifier, out_dir / "cls.onnx", META)
    export(features, out_dir / "feat.onnx", FEATURE_META)
    fixed = {**META, "input_shape": [2, 3, SIZE, SIZE]}
    export(classifier, out_dir / "cls_b2.onnx", fixed, batch=2)
    return SimpleNamespace(
        dir=out_dir, torch_classifier=classifier,
        cls={"onnx": out_dir / "cls.onnx", "mnn": out_dir / "cls.mnn"},
        feat={"onnx": out_dir / "feat.onnx", "mnn": out_dir / "feat.mnn"},
        cls_fixed_batch=out_dir / "cls_b2.onnx")


def write_failing_forward_model(out_dir, task: str = "classification", size: int = SIZE) -> SimpleNamespace:
    """A model that loads but cannot run at its own metadata's input size, as the ONNX and the MNN files: its
    input has free H and W (nothing to check at load), and it adds a [1, 3, 16, 16] constant to a 32x32 input.
    MNN then prints a shape error on stdout and returns no outputs; onnxruntime raises. With size 16 it runs."""
    from onnx import TensorProto, helper

    detector = task == "detection"
    meta = {"task": task, "input_shape": [-1, 3, size, size], "mean": [0.5] * 3, "std": [0.5] * 3,
            "crop_pct": 1.0, "interpolation": "bilinear", "num_classes": 3,
            "output_names": ["boxes", "scores"] if detector else ["logits"]}
    if detector:
        meta.update(resize="letterbox", pad_value=114)
    const = np.ones((1, 3, SIZE // 2, SIZE // 2), np.float32)
    nodes = [helper.make_node("Add", ["input", "c"], ["y"]),
             helper.make_node("ReduceMean", ["y"], ["logits"], axes=[2, 3], keepdims=0)]  # [N, 3]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])]
    if detector:  # boxes [N, 1, 4] and scores [N, 1, 3] from the same mean
        nodes += [helper.make_node("Unsqueeze", ["logits", "one"], ["scores"]),
                  helper.make_node("Concat", ["scores", "logits1"], ["boxes"], axis=2),
                  helper.make_node("Slice", ["scores", "zero", "one", "two"], ["logits1"])]
        nodes[-2], nodes[-1] = nodes[-1], nodes[-2]
        outputs = [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["N", 1, 4]),
                   helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 1, 3])]
    inits = [helper.make_tensor("c", TensorProto.FLOAT, const.shape, const.ravel()),
             helper.make_tensor("one", TensorProto.INT64, [1], [1]),
             helper.make_tensor("zero", TensorProto.INT64, [1], [0]),
             helper.make_tensor("two", TensorProto.INT64, [1], [2])]
    graph = helper.make_graph(nodes, "fails_at_32", [
        helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, "H", "W"])], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    helper.set_model_props(model, {"edgeport": json.dumps(meta)})
    name = out_dir / f"{'fails' if size != SIZE // 2 else 'runs'}_{task}.onnx"
    onnx.save(model, str(name))
    convert(name, name.with_suffix(".mnn"), json.dumps(meta), log_path=name.with_suffix(".log"))
    return SimpleNamespace(onnx=name, mnn=name.with_suffix(".mnn"), meta=meta)


_BUILT: dict = {}


def tiny_artifacts(tmp_path_factory) -> SimpleNamespace:
    """Built once per session, shared with test_runtime_cli.py."""
    if "artifacts" not in _BUILT:
        _BUILT["artifacts"] = build_tiny_artifacts(tmp_path_factory.mktemp("runtime_artifacts"))
    return _BUILT["artifacts"]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return tiny_artifacts(tmp_path_factory)


@pytest.fixture(scope="module")
def predictors(artifacts):
    return {kind: runtime.load(path) for kind, path in artifacts.cls.items()}


def sample_inputs(n_photos: int = 6, n_random: int = 2) -> np.ndarray:
    photos = [preprocess(make_photo(40 + 7 * i, 30 + 11 * i, seed=i), META) for i in range(n_photos)]
    noise = np.random.default_rng(1).standard_normal((n_random, 3, SIZE, SIZE), dtype=np.float32)
    return np.concatenate([*photos, noise])


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


# ---- loading, metadata, parity


@pytest.mark.parametrize("kind", ["onnx", "mnn"])
def test_metadata_and_names(artifacts, kind):
    p = runtime.load(artifacts.cls[kind])
    assert p.meta == META
    assert (p.input_name, p.input_shape, p.output_names) == ("input", [-1, 3, SIZE, SIZE], ["logits"])
    assert p.backend == {"onnx": "onnxruntime", "mnn": "mnn"}[kind]


def test_onnx_mnn_and_torch_agree(artifacts, predictors):
    x = sample_inputs()
    with torch.no_grad():
        ref = artifacts.torch_classifier(torch.from_numpy(x)).numpy()
    assert ref.std() > 1.0  # a realistic logit spread, else agreement proves little
    ort_out = predictors["onnx"].run(x)["logits"]
    mnn_out = predictors["mnn"].run(x)["logits"]
    np.testing.assert_allclose(ort_out, ref, atol=1e-4)
    np.testing.assert_allclose(mnn_out, ort_out, atol=1e-3)
    assert (mnn_out.argmax(1) == ort_out.argmax(1)).all()


def test_feature_model_returns_every_output(artifacts):
    x = sample_inputs(2, 1)
    ort_out, mnn_out = (runtime.load(artifacts.feat[k]).run(x) for k in ("onnx", "mnn"))
    assert list(ort_out) == list(mnn_out) == ["feat_s2", "feat_s4"]
    assert ort_out["feat_s4"].shape == (3, 16, SIZE // 4, SIZE // 4)
    for name in ort_out:
        np.testing.assert_allclose(mnn_out[name], ort_out[name], atol=1e-4)


def test_threads_and_low_precision_load(artifacts, predictors):
    x = sample_inputs(2, 0)
    ref = predictors["mnn"].run(x)["logits"]
    low = runtime.load(artifacts.cls["mnn"], threads=2, precision="low").run(x)["logits"]
    np.testing.assert_allclose(low, ref, atol=0.1)  # fp16 arithmetic on ARMv8.2; exactly fp32 on x86
    ort_2_threads = runtime.load(artifacts.cls["onnx"], threads=2).run(x)["logits"]
    np.testing.assert_allclose(ort_2_threads, ref, atol=1e-3)


# ---- images and preprocessing


def reference_preprocess(img: Image.Image, crop_pct: float, interpolation: int) -> np.ndarray:
    short = math.floor(SIZE / crop_pct)
    w, h = img.size
    new = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    a = np.asarray(img.resize(new, interpolation), dtype=np.float64) / 255.0
    top, left = (int(round((n - SIZE) / 2)) for n in a.shape[:2])
    a = a[top: top + SIZE, left: left + SIZE]
    a = (a - np.array(META["mean"])) / np.array(META["std"])
    return a.transpose(2, 0, 1)[None]


@pytest.mark.parametrize("size", [(50, 40), (40, 61), (32, 32), (1, 1), (300, 97)])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_preprocess_matches_reference(predictors, size, interpolation):
    img = make_photo(*size, seed=sum(size))
    meta = {**META, "interpolation": interpolation, "crop_pct": 0.9}
    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[interpolation]
    expected = reference_preprocess(img, 0.9, resample)
    got = preprocess(img, meta)
    assert got.dtype == np.float32 and got.shape == (1, 3, SIZE, SIZE)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    if interpolation == "bicubic":  # the Predictor takes the same path from its own metadata
        np.testing.assert_allclose(predictors["mnn"].preprocess(img),
                                   reference_preprocess(img, 0.875, Image.BICUBIC), rtol=0, atol=1e-6)


def test_image_modes_to_rgb(tmp_path):
    base = make_photo(24, 18, seed=3)
    gray = base.convert("L")
    gray_rgb = np.repeat(np.asarray(gray)[..., None], 3, axis=2)
    alpha = Image.fromarray(np.random.default_rng(0).integers(0, 256, (18, 24), dtype=np.uint8))
    rgba, la = base.copy(), gray.copy()
    rgba.putalpha(alpha)
    la.putalpha(alpha)
    palette = base.convert("P")
    palette_transparent = palette.copy()
    palette_transparent.info["transparency"] = 0
    gray16 = (np.asarray(gray).astype(np.uint16) * 257)
    Image.fromarray(gray16).save(tmp_path / "gray16.png")
    cases = {
        "RGBA": (rgba, np.asarray(base)), "L": (gray, gray_rgb), "LA": (la, gray_rgb),
        "P": (palette, np.asarray(palette.convert("RGB"))),
        "P+transparency": (palette_transparent, np.asarray(palette.convert("RGB"))),
        "CMYK": (base.convert("CMYK"), np.asarray(base.convert("CMYK").convert("RGB"))),
        "I;16 file": (tmp_path / "gray16.png", gray_rgb),  # 16-bit rescaled, not clipped to 255
        "I": (Image.fromarray(gray16.astype(np.int32)), gray_rgb),
        # float samples scaled by their full scale (1, 255 or 65535), not clipped at 255 (black for [0, 1])
        "F in [0, 1]": (Image.fromarray(np.asarray(gray, np.float32) / 255, "F"), gray_rgb),
        "F in [0, 255]": (Image.fromarray(np.asarray(gray, np.float32), "F"), gray_rgb),
    }
    assert Image.open(tmp_path / "gray16.png").mode.startswith("I")
    for name, (source, expected) in cases.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            img = load_image(source)
        assert img.mode == "RGB", name
        np.testing.assert_array_equal(np.asarray(img), expected, err_msg=name)


def test_exif_orientation_applied(tmp_path):
    base = make_photo(30, 20, seed=5)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    base.save(tmp_path / "rotated.png", exif=exif)
    img = load_image(tmp_path / "rotated.png")
    assert img.size == (20, 30)
    np.testing.assert_array_equal(np.asarray(img), np.asarray(base.transpose(Image.Transpose.ROTATE_270)))


def png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h but whose pixel data is nearly absent: decoding it would fail."""
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def write_bad_images(d) -> dict:
    jpeg = io.BytesIO()
    make_photo(200, 150).save(jpeg, "JPEG")
    files = {
        "not an image": b"hello, I am text\n", "empty file": b"",
        "truncated JPEG": jpeg.getvalue()[: len(jpeg.getvalue()) * 6 // 10],
        "70 MP header": png_header_only(10_000, 7_000), "50,000 px wide header": png_header_only(50_000, 2),
    }
    paths = {}
    for i, (name, data) in enumerate(files.items()):
        paths[name] = d / f"bad{i}.{'jpg' if 'JPEG' in name else 'png'}"
        paths[name].write_bytes(data)
    Image.new("L", (50_000, 1)).save(d / "wide.png")
    paths["50,000 px wide file"] = d / "wide.png"
    paths["missing file"] = d / "missing.png"
    return paths


EXPECTED_IMAGE_ERRORS = {
    "not an image": "not an image", "empty file": "not an image", "truncated JPEG": "truncated",
    "70 MP header": "over the limit", "50,000 px wide header": "over the limit",
    "50,000 px wide file": "over the limit", "missing file": "no such image",
}


def test_bad_images_are_one_line_errors(tmp_path, predictors):
    paths = write_bad_images(tmp_path)
    assert set(paths) == set(EXPECTED_IMAGE_ERRORS)
    for name, path in paths.items():
        with pytest.raises(runtime.EdgeRuntimeError) as e:
            predictors["mnn"].classify(path)
        assert EXPECTED_IMAGE_ERRORS[name] in one_line_error(e), name
    for img in (Image.new("RGB", (0, 0)), Image.new("L", (50_000, 1))):
        with pytest.raises(runtime.EdgeRuntimeError) as e:
            predictors["onnx"].preprocess(img)
        assert "empty" in one_line_error(e) or "over the limit" in one_line_error(e)


def test_size_limit_checked_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    path.write_bytes(png_header_only(10_000, 7_000))
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded an oversized image"))
    with pytest.raises(runtime.EdgeRuntimeError, match="over the limit"):
        load_image(path)


# ---- bad model files and arrays


def write_bad_models(a, d) -> dict:
    mnn, onx = a.cls["mnn"].read_bytes(), a.cls["onnx"].read_bytes()
    files = {"empty.mnn": b"", "truncated.mnn": mnn[: len(mnn) // 2], "text.mnn": b"not a model\n",
             "onnx_named.mnn": onx, "truncated.onnx": onx[: len(onx) // 2], "text.onnx": b"not a model\n",
             "mnn_named.onnx": mnn, "model.bin": mnn}
    for name, data in files.items():
        (d / name).write_bytes(data)
    return {name: d / name for name in [*files, "missing.mnn", "missing.onnx"]}


def test_bad_model_files_are_one_line_errors(artifacts, tmp_path, capfd):
    for name, path in write_bad_models(artifacts, tmp_path).items():
        with pytest.raises(runtime.EdgeRuntimeError) as e:
            runtime.load(path)
        msg = one_line_error(e)
        assert str(path) in msg, name
    assert capfd.readouterr().out == ""  # MNN's own complaints do not reach stdout


@pytest.mark.parametrize("kwargs, match", [
    ({"backend": "tensorrt"}, "unknown engine"), ({"precision": "fp8"}, "unknown precision"),
    ({"threads": 0}, "threads"), ({"backend": "onnxruntime", "precision": "low"}, "MNN option"),
    ({"winograd": "F63"}, "unknown winograd"), ({"backend": "onnxruntime", "winograd": "fast"}, "MNN option"),
])
def test_bad_load_options(artifacts, kwargs, match):
    with pytest.raises(runtime.EdgeRuntimeError, match=match):
        runtime.load(artifacts.cls["onnx"], **kwargs)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the legacy exporter's notice
def test_accurate_winograd_holds_beside_a_fast_predictor(tmp_path):
    """One 64-channel 3x3 conv: MNN's default F(6,3) Winograd is ~1e-3 off in float32, F(2,3) ~3e-7. The fast
    predictor is created last: MNN runtimes with equal configs share the hint, so without setting it at resize
    the accurate one would run F(6,3) too."""
    conv = torch.nn.Conv2d(64, 64, 3, padding=1).eval()
    torch.onnx.export(conv, torch.zeros(1, 64, 64, 64), tmp_path / "conv.onnx", input_names=["input"],
                      output_names=["out"], dynamo=False)
    path = convert(tmp_path / "conv.onnx", tmp_path / "conv.mnn", "{}")
    x = np.random.default_rng(0).standard_normal((1, 64, 64, 64)).astype(np.float32)
    with torch.no_grad():
        ref = conv.double()(torch.from_numpy(x).double()).numpy()
    accurate = runtime.load(path, winograd="accurate")
    fast = runtime.load(path, winograd="fast")
    errors = {name: float(np.abs(p.run(x)["out"] - ref).max() / np.abs(ref).max())
              for name, p in (("accurate", accurate), ("fast", fast))}
    assert errors["accurate"] < 1e-5 < 1e-4 < errors["fast"], errors


BAD_ARRAYS = {
    "float64": np.zeros((1, 3, SIZE, SIZE)), "int": np.zeros((1, 3, SIZE, SIZE), np.int64),
    "HW off": np.zeros((1, 3, SIZE, SIZE - 1), np.float32),
    "channels": np.zeros((1, 4, SIZE, SIZE), np.float32),
    "3-D": np.zeros((3, SIZE, SIZE), np.float32), "empty batch": np.zeros((0, 3, SIZE, SIZE), np.float32),
    "list": [[0.0]], "wrong name": {"image": np.zeros((1, 3, SIZE, SIZE), np.float32)},
}


@pytest.mark.parametrize("kind", ["onnx", "mnn"])
@pytest.mark.parametrize("case", list(BAD_ARRAYS))
def test_bad_arrays_state_what_is_expected(predictors, kind, case):
    with pytest.raises(runtime.EdgeRuntimeError) as e:
        predictors[kind].run(BAD_ARRAYS[case])
    msg = one_line_error(e)
    assert ("float32 array of shape [N, 3, 32, 32]" in msg) or ("expects ['input']" in msg)


def test_fixed_batch_rejects_other_batches_and_classify_pads(artifacts, predictors):
    fixed = runtime.load(artifacts.cls_fixed_batch)
    assert fixed.input_shape == [2, 3, SIZE, SIZE]
    with pytest.raises(runtime.EdgeRuntimeError, match=r"\[2, 3, 32, 32\]"):
        fixed.run(np.zeros((1, 3, SIZE, SIZE), np.float32))
    images = [make_photo(40, 30, seed=i) for i in range(3)]
    got, expected = fixed.classify(images, topk=3), predictors["onnx"].classify(images, topk=3)
    for g, e in zip(got, expected):
        assert [i for i, _ in g] == [i for i, _ in e]
        np.testing.assert_allclose([p for _, p in g], [p for _, p in e], atol=1e-5)


@pytest.mark.parametrize("kind", ["onnx", "mnn"])
def test_non_finite_outputs_are_flagged(predictors, kind):
    nan_input = np.zeros((1, 3, SIZE, SIZE), np.float32)
    nan_input[0, 0, 5, 5] = np.nan
    huge_input = np.full((1, 3, SIZE, SIZE), 3e38, np.float32)  # overflows to Inf inside the network
    for x in (nan_input, huge_input):
        with pytest.raises(runtime.EdgeRuntimeError, match="NaN/Inf") as e:
            predictors[kind].run(x)
        one_line_error(e)
    raw = predictors[kind].run(nan_input, check_finite=False)["logits"]
    assert not (np.abs(raw) < np.finfo(np.float32).max).all()  # MNN saturates NaN to -float-max


# ---- classification


def test_classify_topk_softmax_and_labels(predictors):
    images = [make_photo(45, 35, seed=i) for i in range(3)]
    labels = [f"class_{i}" for i in range(10)]
    for p in predictors.values():
        results = p.classify(images, topk=4, labels=labels)
        assert len(results) == 3
        for img, top in zip(images, results):
            logits = p.run(p.preprocess(img))["logits"][0].astype(np.float64)
            probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
            assert [i for i, _, _ in top] == list(np.argsort(-probs)[:4])
            np.testing.assert_allclose([q for _, q, _ in top], np.sort(probs)[::-1][:4], rtol=1e-6)
            assert [lab for _, _, lab in top] == [labels[i] for i, _, _ in top]
        assert len(p.classify(images[0], topk=50)[0]) == 10  # a single image; topk capped at the classes
    with pytest.raises(runtime.EdgeRuntimeError, match="3 labels"):
        predictors["mnn"].classify(images[0], labels=labels[:3])


def test_classify_on_feature_model_says_use_run(artifacts):
    with pytest.raises(runtime.EdgeRuntimeError, match="use run"):
        runtime.load(artifacts.feat["mnn"]).classify(make_photo(40, 40))


def test_model_without_metadata_runs_but_cannot_preprocess(artifacts, tmp_path):
    plain = tmp_path / "plain.mnn"
    convert(artifacts.cls["onnx"], plain, "", log_path=tmp_path / "plain.log")
    p = runtime.load(plain)
    assert p.meta == {} and p.input_shape == [-1, 3, SIZE, SIZE]  # the graph's own (MNN records batch -1 as 1)
    assert p.run(np.zeros((1, 3, SIZE, SIZE), np.float32))["logits"].shape == (1, 10)
    with pytest.raises(runtime.EdgeRuntimeError, match="no edgeport preprocessing metadata"):
        p.classify(make_photo(40, 40))


# ---- concurrency


@pytest.mark.parametrize("kind", ["onnx", "mnn"])
def test_concurrent_calls_give_sequential_results(artifacts, kind):
    p = runtime.load(artifacts.cls[kind])
    rng = np.random.default_rng(7)
    xs = [rng.standard_normal((1 + i % 3, 3, SIZE, SIZE), dtype=np.float32) for i in range(12)]
    expected = [p.run(x)["logits"] for x in xs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda x: p.run(x)["logits"], xs * 4))
    for g, e in zip(got, expected * 4):
        np.testing.assert_allclose(g, e, rtol=0, atol=1e-6)


def test_elongated_image_is_refused_before_resizing():
    """A 20000×2 strip would be resized to 2,560,000×256 (~2 GB) before a 224² model's centre crop."""
    meta = {"input_shape": [1, 3, 224, 224], "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 0.875,
            "interpolation": "bicubic"}
    with pytest.raises(runtime.EdgeRuntimeError, match="too elongated"):
        preprocess(Image.new("RGB", (20000, 2)), meta)
    assert preprocess(Image.new("RGB", (2000, 200)), meta).shape == (1, 3, 224, 224)  # 10:1 still fine
