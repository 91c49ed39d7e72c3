"""Property-based tests (Hypothesis) of every runtime parser and command line: the artifact metadata schema,
image decoding, and `python -m runtime.infer` / `runtime.detect` run in-process on generated argv. Whatever is
generated, the answer is a result or EdgeRuntimeError / exit 2 with one `error:` line per problem: never a
traceback, an "internal error" (exit 1), a hang, or a C library's own text on stdout/stderr.

Fixed example budgets (conftest's profile: derandomized, no database), the whole file well under a minute."""
from __future__ import annotations

import contextlib
import io
import json
import signal
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_runtime import META, make_photo, tiny_artifacts, write_failing_forward_model

import runtime
from runtime import detect, infer
from runtime.cli import cli_main
from runtime.images import load_image
from runtime.metadata import check_metadata, read_metadata
from runtime.preprocess import preprocess

HANG_SECONDS = 20  # one example; the slowest legitimate one takes well under a second
FIXTURES_OK = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


@contextlib.contextmanager
def no_hang(seconds: int = HANG_SECONDS):
    """Fail (instead of waiting forever) when one example runs longer than `seconds`."""
    def alarm(signum, frame):
        raise TimeoutError(f"example still running after {seconds} s: a hang")
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def assert_one_line(error: Exception) -> str:
    msg = str(error)
    assert isinstance(error, runtime.EdgeRuntimeError), repr(error)
    assert msg and "\n" not in msg and "Traceback" not in msg, msg
    return msg


# ---- the metadata schema

JSON_LEAVES = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
               | st.text(max_size=12))
JSON_VALUES = st.recursive(JSON_LEAVES, lambda inner: st.lists(inner, max_size=5)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
# Values at and around every bound the schema draws
EDGES = st.sampled_from([-1, 0, 1, 2, 3, 4, 0.0999, 0.1, 0.875, 1.0, 1.0001, 255, 256, 20000, 20001, -0.0, 1e308,
                         2**63, True, False, None, "", "x", "bicubic", "letterbox", "detection", [], {}])
SHAPES = st.lists(st.one_of(EDGES, st.sampled_from([-1, 1, 2, 3, 7, 16, 32])), min_size=0, max_size=5)
TRIPLES = st.lists(st.one_of(EDGES, st.floats(-2, 2, allow_nan=False)), min_size=0, max_size=4)
DETECTOR_META = {**META, "task": "detection", "resize": "letterbox", "pad_value": 114, "num_classes": 3,
                 "names": ["a", "b", "c"], "output_names": ["boxes", "scores"], "box_format": "xyxy",
                 "strides": [8, 16, 32], "nms": {"conf": 0.25, "iou": 0.45, "max_det": 300}}
FIELD_VALUES = {"input_shape": SHAPES, "mean": TRIPLES, "std": TRIPLES, "crop_pct": EDGES,
                "interpolation": EDGES, "task": EDGES, "resize": EDGES, "pad_value": EDGES, "num_classes": EDGES,
                "names": JSON_VALUES, "output_names": JSON_VALUES, "nms": JSON_VALUES, "strides": JSON_VALUES}


@st.composite
def edited_metadata(draw):
    """A valid classifier's or detector's metadata with some fields replaced by edge or arbitrary JSON values,
    some removed: (meta, edited field names)."""
    meta = dict(draw(st.sampled_from([META, DETECTOR_META])))
    fields = draw(st.lists(st.sampled_from(sorted(FIELD_VALUES)), min_size=1, max_size=3, unique=True))
    for field in fields:
        if draw(st.integers(0, 9)) == 0:
            meta.pop(field, None)
        else:
            meta[field] = draw(st.one_of(FIELD_VALUES[field], JSON_VALUES))
    return meta, fields


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200),
                 JSON_VALUES.map(json.dumps), edited_metadata().map(lambda m: json.dumps(m[0])),
                 st.integers(1, 5000).map(lambda n: '{"a": ' + "[" * n + "]" * n + "}")))
def test_any_metadata_text_parses_or_is_one_line(text):
    with no_hang():
        try:
            meta = read_metadata(text, "m.mnn")
        except runtime.EdgeRuntimeError as e:
            assert assert_one_line(e).startswith("m.mnn: metadata")
            return
    assert isinstance(meta, dict)
    check_metadata(meta)  # what was accepted stays accepted


@settings(max_examples=250, deadline=None)
@given(edited_metadata(), st.sampled_from([(40, 30), (13, 50), (1, 1), (64, 2)]))
def test_accepted_metadata_preprocesses_or_is_one_line(edited, size):
    """Whatever the schema accepts, preprocessing must be able to use (or refuse in one line); whatever it
    refuses is named by the field that was edited."""
    meta, fields = edited
    try:
        check_metadata(meta, "m.onnx")
    except runtime.EdgeRuntimeError as e:
        msg = assert_one_line(e)
        assert any(f"metadata {field} " in msg for field in fields), (msg, fields)
        return
    if meta.get("input_shape") and max(meta["input_shape"][2:]) > 4096:
        return  # accepted (within memory), but too big an image to build here
    try:
        x = preprocess(make_photo(*size, seed=1), meta)
    except KeyError as e:  # only a field the Predictor first requires (require_metadata) may be absent
        assert e.args[0] in ("input_shape", "mean", "std", "crop_pct", "interpolation"), e
        return
    except runtime.EdgeRuntimeError as e:
        assert_one_line(e)
        return
    h, w = meta["input_shape"][2:]
    assert x.shape == (1, 3, h, w) and x.dtype == np.float32 and np.isfinite(x).all()


# ---- images: valid files of every format and mode, then truncated, corrupted, or with huge header sizes

def _encoded(fmt: str, mode: str, size=(12, 9), seed: int = 2, **options) -> bytes:
    img = make_photo(*size, seed=seed)
    if mode == "F":
        img = Image.fromarray(np.asarray(img.convert("L"), np.float32) / 255, "F")
    elif mode == "I;16":
        img = Image.fromarray(np.asarray(img.convert("L"), np.uint16) * 257)
    else:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


BASE_IMAGES = {
    "png RGB": ("PNG", "RGB", {}), "png RGBA": ("PNG", "RGBA", {}), "png P": ("PNG", "P", {}),
    "png 1": ("PNG", "1", {}), "png I;16": ("PNG", "I;16", {}), "jpeg": ("JPEG", "RGB", {}),
    "jpeg CMYK": ("JPEG", "CMYK", {}), "jpeg progressive": ("JPEG", "L", {"progressive": True}),
    "tiff raw": ("TIFF", "RGB", {}), "tiff lzw": ("TIFF", "RGB", {"compression": "tiff_lzw"}),
    "tiff deflate": ("TIFF", "RGBA", {"compression": "tiff_adobe_deflate"}),
    "tiff jpeg": ("TIFF", "RGB", {"compression": "jpeg"}), "tiff packbits": ("TIFF", "L", {"compression": "packbits"}),
    "tiff F": ("TIFF", "F", {}), "gif": ("GIF", "P", {}), "bmp": ("BMP", "RGB", {}), "webp": ("WEBP", "RGB", {}),
    "ppm": ("PPM", "RGB", {}),
}
HUGE = [0, 1, 19999, 20001, 65535, 2**31 - 1, 2**32 - 1]


@st.composite
def damaged_images(draw):
    name = draw(st.sampled_from(sorted(BASE_IMAGES)))
    fmt, mode, options = BASE_IMAGES[name]
    data = bytearray(_encoded(fmt, mode, **options))
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["truncate", "flip", "size", "insert"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if kind == "truncate":
            del data[at:]
        elif kind == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:  # a 16- or 32-bit size field, wherever it is: PNG IHDR, BMP, TIFF tags, GIF screen, JPEG SOF
            value, width = draw(st.sampled_from(HUGE)), draw(st.sampled_from([2, 4]))
            order = draw(st.sampled_from([">", "<"]))
            packed = struct.pack(order + ("H" if width == 2 else "I"), value % (1 << (8 * width)))
            data[at:at + width] = packed
    return name, bytes(data)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@settings(max_examples=250, deadline=None, suppress_health_check=FIXTURES_OK)
@given(damaged_images())
def test_damaged_images_decode_or_are_one_line_and_silent(workdir, capfd, case):
    name, data = case
    path = workdir / ("image." + BASE_IMAGES[name][0].lower())
    path.write_bytes(data)
    capfd.readouterr()
    with no_hang():
        try:
            img = load_image(path)
        except runtime.EdgeRuntimeError as e:
            assert str(path) in assert_one_line(e)
        else:
            assert img.mode == "RGB" and min(img.size) >= 1
    out, err = capfd.readouterr()
    assert out == "" and err == "", (name, out, err)  # no libtiff/libjpeg lines, no Pillow warnings


def test_corrupt_lzw_tiff_keeps_libtiff_quiet(workdir, capfd):
    """The case that printed "Using code not yet in table." beside our error: one error, nothing else."""
    data = bytearray(_encoded("TIFF", "RGB", (64, 48), 0, compression="tiff_lzw"))
    for i in range(200, min(len(data), 2000), 7):
        data[i] ^= 0x5A
    (workdir / "lzw.tif").write_bytes(bytes(data))
    capfd.readouterr()
    with pytest.raises(runtime.EdgeRuntimeError, match="decoder error") as e:
        load_image(workdir / "lzw.tif")
    assert "Using code not yet in table" in assert_one_line(e.value)  # libtiff's reason, in our one line
    assert capfd.readouterr() == ("", "")


# ---- the command lines, in-process


@pytest.fixture(scope="module")
def files(tmp_path_factory, workdir):
    tiny = tiny_artifacts(tmp_path_factory)
    d = tmp_path_factory.mktemp("fuzz_cli")
    made = {"cls.mnn": tiny.cls["mnn"], "cls.onnx": tiny.cls["onnx"], "feat.mnn": tiny.feat["mnn"]}
    for task in ("classification", "detection"):
        for size, label in ((32, "fails"), (16, "runs")):
            built = write_failing_forward_model(d, task, size)
            made[f"{label}_{task}.mnn"], made[f"{label}_{task}.onnx"] = built.mnn, built.onnx
    for i in range(3):
        make_photo(30 + 9 * i, 24 + 5 * i, seed=i).save(d / f"photo{i}.png")
    (d / "photos").mkdir()
    make_photo(20, 20).save(d / "photos" / "p.jpg")
    (d / "empty").mkdir()
    (d / "a_file.txt").write_text("mine\n")
    made.update({"photo0.png": d / "photo0.png", "photo1.png": d / "photo1.png", "photos": d / "photos",
                 "empty": d / "empty", "a_file.txt": d / "a_file.txt", "missing.png": d / "missing.png",
                 "missing.mnn": d / "missing.mnn"})
    return {name: str(path) for name, path in made.items()}, d


def run_cli(main, argv, capfd) -> tuple[int, str, str]:
    capfd.readouterr()
    with no_hang():
        try:
            code = cli_main(main, argv)
        except SystemExit as e:  # argparse: usage errors (2)
            code = e.code
    out, err = capfd.readouterr()
    return code, out, err


def check_cli(code, err) -> None:
    assert code in (0, 2), (code, err)
    assert "Traceback" not in err and "internal error" not in err, err
    for line in err.splitlines():
        assert line.startswith(("error: ", "warning: ")), err
    if code == 0:
        assert "error: " not in err, err


NUMBERS = st.one_of(st.integers(-3, 400).map(str), st.sampled_from(["x", "", "1.5", "nan", "inf", "-0", "1e9"]))
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr),
                   st.sampled_from(["0", "1", "0.5", "x", "", "-0.1", "1.01"]))


def generated_file(draw, d, suffix: str) -> str:
    """A file of generated bytes, or a damaged image, named with `suffix`."""
    path = d / f"generated{draw(st.integers(0, 2))}{suffix}"
    data = draw(st.one_of(st.binary(max_size=64), damaged_images().map(lambda c: c[1])))
    path.write_bytes(data)
    return str(path)


@st.composite
def infer_argv(draw, files, d):
    model = draw(st.one_of(st.sampled_from(["cls.mnn", "cls.onnx", "feat.mnn", "fails_classification.mnn",
                                            "fails_classification.onnx", "runs_classification.mnn",
                                            "runs_classification.onnx", "runs_detection.mnn", "missing.mnn",
                                            "photos"]).map(files.get),
                           st.sampled_from([".mnn", ".onnx"]).map(lambda s: generated_file(draw, d, s))))
    images = draw(st.lists(st.one_of(
        st.sampled_from(["photo0.png", "photo1.png", "photos", "empty", "missing.png", "a_file.txt"]).map(files.get),
        st.sampled_from([".png", ".jpg", ".tif"]).map(lambda s: generated_file(draw, d, s))), min_size=1, max_size=3))
    argv = [model, *images]
    options = {"--topk": NUMBERS, "--threads": st.sampled_from(["1", "2", "0", "x"]),
               "--precision": st.sampled_from(["fp32", "low", "fp8"]),
               "--winograd": st.sampled_from(["accurate", "fast", "F63"]),
               "--backend": st.sampled_from(["auto", "mnn", "onnxruntime", "tensorrt"]),
               "--bench": st.sampled_from(["0", "2", "-1", "x"]),
               "--labels": st.just(None), "--json": st.just(None)}
    return with_options(draw, argv, options, d)


def with_options(draw, argv: list, options: dict, d) -> list:
    """`argv` plus up to 4 of `options` ({flag: strategy of its value}; --json is a switch, --labels a generated
    file)."""
    for option in draw(st.lists(st.sampled_from(sorted(options)), max_size=4, unique=True)):
        if option == "--json":
            argv.append(option)
        elif option == "--labels":
            argv += [option, generated_file(draw, d, ".txt")]
        else:
            argv += [option, draw(options[option])]
    return argv


@st.composite
def detect_argv(draw, files, d):
    model = draw(st.one_of(st.sampled_from(["runs_detection.mnn", "runs_detection.onnx", "fails_detection.mnn",
                                            "fails_detection.onnx", "cls.mnn", "missing.mnn"]).map(files.get),
                           st.sampled_from([".mnn", ".onnx"]).map(lambda s: generated_file(draw, d, s))))
    images = draw(st.lists(st.one_of(
        st.sampled_from(["photo0.png", "photo1.png", "photos", "missing.png"]).map(files.get),
        st.sampled_from([".png", ".jpg"]).map(lambda s: generated_file(draw, d, s))), min_size=1, max_size=3))
    argv = [model, *images]
    options = {"--conf": FLOATS, "--iou": FLOATS, "--max-det": NUMBERS, "--threads": st.sampled_from(["1", "0"]),
               "--backend": st.sampled_from(["auto", "mnn", "onnxruntime", "x"]),
               "--save-dir": st.sampled_from([str(d / "out"), str(d / "out" / "deeper"), files["a_file.txt"],
                                              files["a_file.txt"] + "/below", "/dev/null"]),
               "--labels": st.just(None), "--json": st.just(None)}
    return with_options(draw, argv, options, d)


@settings(max_examples=60, deadline=None, suppress_health_check=FIXTURES_OK)
@given(data=st.data())
def test_infer_cli_never_crashes(files, capfd, data):
    names, d = files
    argv = data.draw(infer_argv(names, d))
    code, out, err = run_cli(infer.main, argv, capfd)
    check_cli(code, err)
    if "--json" in argv and code in (0, 2) and out:
        json.loads(out)  # stdout stays one JSON document: no engine banner, no stray line


@settings(max_examples=60, deadline=None, suppress_health_check=FIXTURES_OK)
@given(data=st.data())
def test_detect_cli_never_crashes(files, capfd, data):
    names, d = files
    argv = data.draw(detect_argv(names, d))
    code, out, err = run_cli(detect.main, argv, capfd)
    check_cli(code, err)
    if "--json" in argv and out:
        json.loads(out)
    assert open(names["a_file.txt"]).read() == "mine\n"  # a file given as --save-dir is never touched


def test_generated_cases_reach_the_engines(files, capfd):
    """The generators are not all refused at the door: a working model and photo give exit 0 with results."""
    names, _ = files
    code, out, err = run_cli(infer.main, [names["runs_classification.mnn"], names["photo0.png"], "--json"], capfd)
    assert code == 0 and json.loads(out)["results"][0]["topk"], err
    code, out, err = run_cli(detect.main, [names["runs_detection.onnx"], names["photo0.png"], "--json"], capfd)
    assert code == 0 and "detections" in json.loads(out)["results"][0], err
