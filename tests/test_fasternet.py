"""FasterNet: sizes against the paper/timm, PConv forms, features_only and checkpoint layouts."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import models
from models.errors import EdgeportError
from models.fasternet import FasterNet, checkpoint_layout, convert_fasternet_checkpoint
from models.layers import PartialConv

# (params M, MACs G at 224², batch 1): official repo / timm model cards.
TARGETS = {
    "fasternet_t0": (3.905, 0.335),
    "fasternet_t1": (7.595, 0.851),
    "fasternet_t2": (14.983, 1.904),
    "fasternet_s": (31.181, 4.550),
    "fasternet_m": (53.521, 8.722),
    "fasternet_l": (93.465, 15.494),
}


def _params_and_macs(model: nn.Module, size: int) -> tuple[int, dict[str, float]]:
    """Parameter count and MACs per module name, from shapes only (the model lives on the meta device)."""
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        model.eval()(torch.empty(1, 3, size, size))
    macs = {name.split(".", 1)[1] if "." in name else name: sum(ops.values()) / 2
            for name, ops in counter.get_flop_counts().items()}
    return sum(p.numel() for p in model.parameters()), macs


@pytest.mark.parametrize("name", list(TARGETS))
def test_params_and_macs_match_the_paper(name):
    with torch.device("meta"):
        model = models.create_model(name)
    params, macs = _params_and_macs(model, 224)
    want_params, want_macs = TARGETS[name]
    assert params / 1e6 == pytest.approx(want_params, rel=0.01)
    assert macs["Global"] / 1e9 == pytest.approx(want_macs, rel=0.01)


def test_size_matches_the_seed_fvcore_table():
    """Seed 000: FasterNet(depths=(1, 1, 1, 1)), embed 96, at 256² — 7.4M params and per-layer MACs."""
    with torch.device("meta"):
        model = FasterNet(embed_dim=96, depths=(1, 1, 1, 1))
    params, macs = _params_and_macs(model, 256)
    assert params / 1e6 == pytest.approx(7.400, abs=0.0005)
    seed_macs_m = {"patch_embed.conv": 18.874, "stages.0.blocks.0.spatial_mixing.conv": 21.234,
                   "stages.3.blocks.0.spatial_mixing.conv": 21.234, "stages.1.downsample.conv": 75.497,
                   "head.conv": 0.983, "head.fc": 1.28}
    for name, want in seed_macs_m.items():
        assert macs[name] / 1e6 == pytest.approx(want, abs=0.001), name


def test_default_cfg_and_overrides():
    model = models.create_model("fasternet_t0", num_classes=10, embed_dim=16, depths=(1, 1, 1, 1),
                                drop_path_rate=0.2, pconv="slicing", mlp="fc")
    cfg = model.default_cfg
    assert (cfg["family"], cfg["architecture"], cfg["num_classes"]) == ("fasternet", "fasternet_t0", 10)
    assert (cfg["crop_pct"], cfg["interpolation"], cfg["input_size"]) == (0.9, "bicubic", (3, 224, 224))
    assert model.feature_channels == [16, 32, 64, 128]
    assert isinstance(model.head.fc, nn.Linear) and model.head.fc.out_features == 10
    assert {m.form for m in model.modules() if isinstance(m, PartialConv)} == {"slicing"}
    drop = [b.drop_path.p for s in model.stages for b in s.blocks]
    assert drop[0] == 0.0 and drop[-1] == pytest.approx(0.2)
    with torch.device("meta"):
        assert isinstance(models.create_model("fasternet_t1").stages[0].blocks[0].mlp.act, nn.GELU)
        assert isinstance(models.create_model("fasternet_t2").stages[0].blocks[0].mlp.act, nn.ReLU)


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics, so weights that land in the wrong norm change the output."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


@torch.no_grad()
def test_pconv_forms_give_identical_outputs():
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    model = _randomize_bn(models.create_model("fasternet_t0"))
    pconvs = [m for m in model.modules() if isinstance(m, PartialConv)]
    want = model(x)
    for form in ("slicing", "full"):
        for m in pconvs:
            m.form = form
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    pconvs[-1].conv.weight.mul_(1.5)  # the comparison can fail: the PConv weights matter in every form
    for form in PartialConv.FORMS:
        for m in pconvs:
            m.form = form
        assert not torch.allclose(model(x), want, rtol=1e-5, atol=1e-5), form


@torch.no_grad()
def test_slicing_keeps_the_block_input_intact():
    block = _randomize_bn(models.create_model("fasternet_t0", pconv="slicing")).stages[1].blocks[0]
    x = torch.randn(1, 80, 8, 8)
    before = x.clone()
    out = block(x)
    assert torch.equal(x, before)
    block.spatial_mixing.form = "split_cat"
    torch.testing.assert_close(out, block(x), rtol=0, atol=0)


@torch.no_grad()
def test_features_only():
    model = _randomize_bn(models.create_model("fasternet_t0", features_only=True))
    feats = model(torch.randn(1, 3, 64, 96))
    assert model.features_only is True and not hasattr(model, "head")
    assert [f.shape[1] for f in feats] == model.feature_channels == [40, 80, 160, 320]
    assert [(64 // f.shape[2], 96 // f.shape[3]) for f in feats] == [(4, 4), (8, 8), (16, 16), (32, 32)]


# --- checkpoint layouts: a reference network with the official module names, written from the paper/repo ---

class _OfficialBlock(nn.Module):
    def __init__(self, dim, act):
        super().__init__()
        self.spatial_mixing = nn.Module()
        self.spatial_mixing.partial_conv3 = nn.Conv2d(dim // 4, dim // 4, 3, 1, 1, bias=False)
        self.mlp = nn.Sequential(nn.Conv2d(dim, 2 * dim, 1, bias=False), nn.BatchNorm2d(2 * dim), act(),
                                 nn.Conv2d(2 * dim, dim, 1, bias=False))

    def forward(self, x):
        d = x.shape[1] // 4
        mixed = torch.cat((self.spatial_mixing.partial_conv3(x[:, :d]), x[:, d:]), 1)
        return x + self.mlp(mixed)


class _OfficialFasterNet(nn.Module):
    def __init__(self, embed_dim, depths, act, fork_feat=False, num_classes=1000):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, embed_dim, 4, 4, bias=False)
        self.patch_embed.norm = nn.BatchNorm2d(embed_dim)
        stages = []
        for i, depth in enumerate(depths):
            dim = embed_dim * 2 ** i
            stage = nn.Sequential()
            stage.add_module("blocks", nn.Sequential(*[_OfficialBlock(dim, act) for _ in range(depth)]))
            stages.append(stage)
            if i < len(depths) - 1:
                merge = nn.Sequential()
                merge.add_module("reduction", nn.Conv2d(dim, 2 * dim, 2, 2, bias=False))
                merge.add_module("norm", nn.BatchNorm2d(2 * dim))
                stages.append(merge)
        self.stages = nn.Sequential(*stages)
        self.fork_feat = fork_feat
        if fork_feat:
            for i in range(len(depths)):
                self.add_module(f"norm{2 * i}", nn.BatchNorm2d(embed_dim * 2 ** i))
        else:
            last = embed_dim * 2 ** (len(depths) - 1)
            self.avgpool_pre_head = nn.Sequential(nn.AdaptiveAvgPool2d(1),
                                                  nn.Conv2d(last, 1280, 1, bias=False), act())
            self.head = nn.Linear(1280, num_classes)
        for p in self.parameters():
            nn.init.normal_(p, std=0.05)

    def stage_outputs(self, x):
        x = self.patch_embed.norm(self.patch_embed.proj(x))
        outs = []
        for idx, stage in enumerate(self.stages):
            x = stage(x)
            if idx % 2 == 0:
                outs.append(getattr(self, f"norm{idx}")(x) if self.fork_feat else x)
        return outs

    def forward(self, x):
        if self.fork_feat:
            return self.stage_outputs(x)
        x = self.stages(self.patch_embed.norm(self.patch_embed.proj(x)))
        return self.head(torch.flatten(self.avgpool_pre_head(x), 1))


def _official_to_timm(sd: dict) -> dict:
    """timm's own checkpoint_filter_fn renaming: merges move into the next stage as `downsample`."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^stages\.(\d+)\.", lambda m: f"stages.{int(m[1]) // 2}." if int(m[1]) % 2 == 0
                   else f"stages.{(int(m[1]) + 1) // 2}.downsample.", k)
        k = re.sub(r"^avgpool_pre_head\.1\.", "conv_head.", k)
        out[re.sub(r"^head\.", "classifier.", k)] = v
    return out


def _ours_to_official(sd: dict) -> dict:
    rules = [(r"^stages\.(\d+)\.blocks\.", lambda m: f"stages.{2 * int(m[1])}.blocks."),
             (r"^stages\.(\d+)\.downsample\.conv\.", lambda m: f"stages.{2 * int(m[1]) - 1}.reduction."),
             (r"^stages\.(\d+)\.downsample\.bn\.", lambda m: f"stages.{2 * int(m[1]) - 1}.norm."),
             (r"^out_norms\.(\d+)\.", lambda m: f"norm{2 * int(m[1])}."),
             (r"^head\.conv\.", "avgpool_pre_head.1."), (r"^head\.fc\.", "head."),
             (r"^patch_embed\.conv\.", "patch_embed.proj."), (r"^patch_embed\.bn\.", "patch_embed.norm."),
             (r"\.spatial_mixing\.conv\.", ".spatial_mixing.partial_conv3."), (r"\.mlp\.fc1\.", ".mlp.0."),
             (r"\.mlp\.mid_norm\.", ".mlp.1."), (r"\.mlp\.fc2\.", ".mlp.3.")]
    out = {}
    for k, v in sd.items():
        for pattern, repl in rules:
            k = re.sub(pattern, repl, k)
        out[k] = v
    return out


def _assert_same_outputs(a, b):
    for x, y in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


SMALL = dict(embed_dim=16, depths=(1, 2, 2, 1))  # every mapping case (several blocks per stage), but quick


def _load_and_compare(name, checkpoint, x, want, features_only=False):
    model = models.create_model(name, features_only=features_only, **SMALL).eval()
    with pytest.raises(AssertionError):  # before loading, the comparison fails
        _assert_same_outputs(model(x), want)
    report = models.load_checkpoint(model, checkpoint)
    assert report == {"missing": [], "unexpected": [], "mismatched": []}
    _assert_same_outputs(model(x), want)


@torch.no_grad()
def test_official_and_timm_checkpoints_load_and_match():
    x = torch.randn(2, 3, 64, 64)
    official = _randomize_bn(_OfficialFasterNet(SMALL["embed_dim"], SMALL["depths"], nn.GELU))
    sd = official.state_dict()
    for layout, checkpoint in {"official": sd, "timm": _official_to_timm(sd)}.items():
        assert checkpoint_layout(checkpoint) == layout
        _load_and_compare("fasternet_t0", checkpoint, x, official(x))
    # a classification checkpoint gives a features_only model the raw stage outputs (identity fork norms)
    for checkpoint in (sd, _official_to_timm(sd)):
        _load_and_compare("fasternet_t0", checkpoint, x, official.stage_outputs(x), features_only=True)


@torch.no_grad()
def test_official_fork_feat_checkpoint_loads_into_features_only():
    x = torch.randn(1, 3, 64, 64)
    official = _randomize_bn(_OfficialFasterNet(SMALL["embed_dim"], SMALL["depths"], nn.ReLU, fork_feat=True))
    assert checkpoint_layout(official.state_dict()) == "official"
    _load_and_compare("fasternet_t2", official.state_dict(), x, official(x), features_only=True)


@torch.no_grad()
def test_our_layout_round_trips_and_passes_through():
    x = torch.randn(1, 3, 64, 64)
    ours = _randomize_bn(models.create_model("fasternet_t0", **SMALL))
    assert checkpoint_layout(ours.state_dict()) == "ours"
    for checkpoint in (ours.state_dict(), _ours_to_official(ours.state_dict())):
        _load_and_compare("fasternet_t0", checkpoint, x, ours(x))
    # fc-form MLPs take the same checkpoint (1x1 conv weights reshaped by the loader)
    fc = models.create_model("fasternet_t0", mlp="fc", weights=ours.state_dict(), **SMALL).eval()
    _assert_same_outputs(fc(x), ours(x))


def test_official_names_match_the_seed_table_and_layer_scale_maps_to_gamma():
    """The official names/shapes of seed 000's fvcore table (FasterNet(depths=(1, 1, 1, 1)), embed 96)."""
    with torch.device("meta"):
        official = _OfficialFasterNet(96, (1, 1, 1, 1), nn.ReLU).state_dict()
        ours = FasterNet(embed_dim=96, depths=(1, 1, 1, 1)).state_dict()
    seed = {"patch_embed.proj.weight": (96, 3, 4, 4), "patch_embed.norm.weight": (96,),
            "stages.1.reduction.weight": (192, 96, 2, 2), "stages.5.norm.weight": (768,),
            "stages.6.blocks.0.spatial_mixing.partial_conv3.weight": (192, 192, 3, 3),
            "avgpool_pre_head.1.weight": (1280, 768, 1, 1), "head.weight": (1000, 1280), "head.bias": (1000,)}
    assert {k: tuple(official[k].shape) for k in seed} == seed
    assert {k: tuple(v.shape) for k, v in _ours_to_official(ours).items()} == \
        {k: tuple(v.shape) for k, v in official.items()}
    converted = convert_fasternet_checkpoint({"patch_embed.proj.weight": torch.zeros(1),
                                              "stages.4.blocks.2.layer_scale": torch.zeros(1)})
    assert list(converted) == ["patch_embed.conv.weight", "stages.2.blocks.2.mlp.gamma"]


def test_wrong_variant_names_keys_and_shapes():
    checkpoint = _ours_to_official(models.create_model("fasternet_t1").state_dict())
    model = models.create_model("fasternet_t0")
    shapes = r"patch_embed\.conv\.weight \(64, 3, 4, 4\) vs model \(40, 3, 4, 4\)"
    with pytest.raises(EdgeportError, match=r"fasternet_t0.*" + shapes):
        models.load_checkpoint(model, checkpoint)
    report = models.load_checkpoint(model, checkpoint, strict=False)
    assert "head.fc.weight" not in report["mismatched"] and "head.conv.weight" in report["mismatched"]
    assert report["missing"] == [] and report["unexpected"] == []
    assert torch.equal(model.head.fc.weight, checkpoint["head.weight"])  # what fits was loaded
