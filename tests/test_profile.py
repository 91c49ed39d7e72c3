"""Per-op profile: shares and rankings from rows, a real profile of a tiny model in both engines (MNN names its
exact GELU), and the CLI's one-line errors."""
from __future__ import annotations

import json

import onnx
import pytest
import torch
from torch import nn

from benchmarks import profile as prof


def test_summarize_ranks_types_and_nodes_by_time():
    rows = [("a", "Conv", 3.0), ("b", "Conv", 1.5), ("c", "Gelu", 4.0), ("d", "Add", 1.5)]
    r = prof.summarize(rows, engine="x", artifact="m", threads=1, runs=1, wall_ms=10.0, layout_conversions=0,
                       op_counts={})
    assert r["total_ms"] == 10.0
    assert [(t["op_type"], t["count"], t["share"]) for t in r["by_type"]] == \
        [("Conv", 2, 0.45), ("Gelu", 1, 0.4), ("Add", 1, 0.15)]
    assert [n["node"] for n in r["slowest"]][:2] == ["c", "a"]
    assert abs(sum(t["share"] for t in r["by_type"]) - 1) < 1e-12


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(3, 16, 1), nn.Conv2d(16, 8, 3, padding=1)
        self.act = nn.GELU()

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    from export import mnn_convert

    d = tmp_path_factory.mktemp("profile")
    torch.manual_seed(0)
    torch.onnx.export(Tiny().eval(), (torch.randn(1, 3, 16, 16),), str(d / "tiny.onnx"), dynamo=False,
                      opset_version=17, input_names=["x"], output_names=["y"])
    mnn_convert.convert(d / "tiny.onnx", d / "tiny.mnn", "test")
    return d


@pytest.mark.parametrize("name, expect", [("tiny.onnx", "Conv"), ("tiny.mnn", "UnaryOp GELU_STANDARD")])
def test_profile_of_a_real_model(artifacts, name, expect):
    r = prof.profile(artifacts / name, runs=2, warmup=1)
    types = {t["op_type"] for t in r["by_type"]}
    assert expect in types
    assert abs(sum(t["share"] for t in r["by_type"]) - 1) < 1e-9
    assert 0 < len(r["slowest"]) <= prof.TOP_NODES
    assert r["total_ms"] > 0 and r["wall_ms"] > 0 and r["layout_conversions"] >= 0
    if name.endswith(".mnn"):
        assert r["layout_conversions"] == r["op_counts"].get("ConvertTensor", 0) > 0
    md = prof.to_markdown(r)
    assert "| op type | nodes | ms | share |" in md and expect in md
    json.dumps(r)  # the --json output


def test_cli_prints_markdown(artifacts, capsys):
    assert prof.main([str(artifacts / "tiny.onnx"), "--runs", "1"]) == 0
    assert "| slowest node |" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["/nonexistent/model.mnn"], ["README.md"], ["x.onnx", "--runs", "0"]])
def test_cli_bad_input_is_one_line_and_exit_2(argv, capsys):
    assert prof.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err


def test_cli_rejects_a_truncated_file(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [])).SerializeToString()[:3])
    assert prof.main([str(bad)]) == 2
    assert capsys.readouterr().err.startswith("error:")
