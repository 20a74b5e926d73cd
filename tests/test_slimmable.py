"""The slimmable TinyUNet (DDSM) and its sandwich training.

The reference for a width w is a plain TinyUNet built at that width's channel counts, given
the slimmable network's weights sliced by the rule written out here (docs/DESIGN.md §4c):
output rows a prefix (q, k and v each for attention), input columns the first active
channels of each concatenated part, the final convolution's output full.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from stepdrop import FusedSampler, NoiseSchedule, TinyUNet
from stepdrop.checkpoint import load_checkpoint
from stepdrop.cost import gflops_per_variant
from stepdrop.models import SlimmableTinyUNet, build_model
from stepdrop.models.slimmable import active_channels
from stepdrop.train import train
from stepdrop.variants import parse_calls
from test_sampler import gen
from test_train import make_config, make_data

CONFIG = dict(in_channels=1, image_size=16, base_channels=32, channel_mults=(1, 2), num_res_blocks=1,
              attention_resolutions=(8,), prediction_type="v_prediction")


def slim(**kw) -> SlimmableTinyUNet:
    torch.manual_seed(0)
    return SlimmableTinyUNet(**{**CONFIG, **kw}).eval()


def narrow_reference(model: SlimmableTinyUNet, width: float) -> TinyUNet:
    """A TinyUNet at ``width``'s channel counts carrying ``model``'s sliced weights. Its time
    embedding stays the full sinusoid (the slimmable network feeds all of it to a sliced MLP)."""
    c = model.config
    base = active_channels(c["base_channels"], width)
    ref = TinyUNet(**{k: v for k, v in c.items() if k not in ("widths", "base_channels", "time_embed_dim")},
                   base_channels=base, time_embed_dim=active_channels(c["time_embed_dim"], width)).eval()
    ref.time_mlp[0] = nn.Linear(c["base_channels"], ref.time_mlp[0].out_features)
    ref._config["base_channels"] = c["base_channels"]  # the embedding's width, as in the slimmable network
    modules = dict(model.named_modules())
    state = {}
    for name, p in ref.state_dict().items():
        owner, kind = name.rsplit(".", 1)
        full = model.state_dict()[name]
        layer = modules[owner]
        if owner.endswith("qkv"):
            third = full.shape[0] // 3
            rows = torch.cat([torch.arange(i * third, i * third + p.shape[0] // 3) for i in range(3)])
        else:
            rows = torch.arange(p.shape[0])
        w = full[rows]
        parts = getattr(layer, "in_parts", None)
        if kind == "weight" and w.ndim > 1:
            cols = torch.cat([torch.arange(s, s + active_channels(n, width)) for s, n in
                              zip([0, parts[0]], parts)]) if parts else torch.arange(p.shape[1])
            w = w[:, cols]
        elif kind in ("weight", "bias") and isinstance(layer, nn.GroupNorm) and parts:
            w = full[torch.cat([torch.arange(s, s + active_channels(n, width)) for s, n in zip([0, parts[0]], parts)])]
        state[name] = w
    ref.load_state_dict(state)
    return ref


@pytest.mark.parametrize("num_res_blocks", [1, 2])
def test_full_width_is_the_tinyunet_bit_for_bit(num_res_blocks):
    model = slim(num_res_blocks=num_res_blocks)
    plain = TinyUNet(**{**CONFIG, "num_res_blocks": num_res_blocks}).eval()
    plain.load_state_dict(model.state_dict())  # the same state dict: a TinyUNet file warm-starts it
    x, t = torch.randn(3, 1, 16, 16, generator=gen(0)), torch.tensor([999, 400, 0])
    with torch.no_grad():
        assert torch.equal(model(x, t), plain(x, t))


@pytest.mark.parametrize("width", [0.75, 0.5, 0.25])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_each_width_equals_the_sliced_reference(width, dtype):
    model = slim().to(dtype)
    ref = narrow_reference(model, width).to(dtype)
    x = torch.randn(5, 1, 16, 16, generator=gen(1), dtype=dtype)[:, :, :, :]  # odd batch
    x = x.transpose(2, 3).contiguous().transpose(2, 3)  # non-contiguous
    t = torch.tensor([999, 700, 300, 20, 0])
    with torch.no_grad(), model.at_width(width):
        out = model(x, t)
    assert model.width == 1.0  # restored
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out, ref(x, t), rtol=tol, atol=tol)
    assert out.shape == x.shape  # the final convolution keeps its full output


def test_flops_and_groups_per_width():
    model = slim()
    flops = gflops_per_variant(model, parse_calls("+width(1,0.75,0.5,0.25)"))
    assert flops["full"] > flops["w0.75"] > flops["w0.5"] > flops["w0.25"]
    assert flops["w0.5"] == pytest.approx(flops["full"] / 4, rel=0.1)  # channels² scaling
    with model.at_width(0.25):  # 8 channels: fewer groups than norm_groups = 32, each whole
        assert model(torch.randn(1, 1, 16, 16), 5).shape == (1, 1, 16, 16)
    assert math.gcd(32, active_channels(32, 0.25)) == 8


def test_widths_outside_the_set_are_refused_by_name():
    model = slim()
    with pytest.raises(ValueError, match=r"width must be one of the widths this network was built for .*got 0.6"):
        model.set_width(0.6)
    with pytest.raises(ValueError, match=r"widths must include the full width 1.0"):
        SlimmableTinyUNet(widths=(0.5, 0.25), **CONFIG)
    with pytest.raises(ValueError, match=r"widths must be in \(0.0, 1.0\]"):
        SlimmableTinyUNet(widths=(1.0, 1.5), **CONFIG)
    with pytest.raises(ValueError, match=r"width must be among the widths the model was trained at .*got 0.6"):
        FusedSampler(model, NoiseSchedule.linear(1000), calls="+width(0.6)").sample(1, "uniform", budget=2)
    with pytest.raises(ValueError, match="width needs a slimmable model"):
        FusedSampler(TinyUNet(**CONFIG), NoiseSchedule.linear(1000), calls="+width(0.5)").sample(1, "uniform",
                                                                                                  budget=2)
    with pytest.raises(ValueError, match="a width schedule of 3 calls cannot run a plan of 4 calls"):
        FusedSampler(model, NoiseSchedule.linear(1000), calls="+width(1,0.5,0.5)").sample(1, "uniform", budget=4)


def test_sampler_runs_a_width_schedule_and_leaves_full_width():
    model = slim()
    schedule = NoiseSchedule.linear(1000)
    sampler = FusedSampler(model, schedule, solver="unipc", calls="+width(0.25,0.5,0.75,1)+cache(2,0)")
    images, stats = sampler.sample(3, "uniform", budget=4, generator=gen(0))
    assert stats.variants == ("w0.25", "w0.5", "w0.75", "full")  # a width change forces a full call
    assert model.width == 1.0 and torch.isfinite(images).all()
    model.set_width(0.5)  # the width the user left is restored, not reset to 1
    FusedSampler(model, schedule, calls="+width(0.25)").sample(1, "uniform", budget=2, generator=gen(0))
    assert model.width == 0.5
    model.set_width(1.0)
    one, _ = FusedSampler(model, schedule, calls="+width(0.5)").sample(3, "uniform", budget=4, generator=gen(0))
    with model.at_width(0.5):
        same, _ = FusedSampler(model, schedule).sample(3, "uniform", budget=4, generator=gen(0))
    assert torch.equal(one, same)


def test_sandwich_training_resumes_and_loads_as_slimmable(tmp_path, monkeypatch):
    data = make_data()
    widths_seen = []
    original = SlimmableTinyUNet.set_width
    monkeypatch.setattr(SlimmableTinyUNet, "set_width", lambda self, w: widths_seen.append(w) or original(self, w))
    path = train(make_config(tmp_path / "a", steps=4, slimmable=True), data=data, progress=False)
    # three passes per step (1, the narrowest, one of the middle ones), then back to full width
    steps = [widths_seen[i:i + 4] for i in range(0, len(widths_seen), 4)]
    assert len(steps) == 4 and all(s[0] == 1.0 and s[1] == 0.25 and s[2] in (0.75, 0.5) and s[3] == 1.0 for s in steps)
    loaded = load_checkpoint(path)
    assert isinstance(loaded.model, SlimmableTinyUNet) and loaded.model.widths == (1.0, 0.75, 0.5, 0.25)
    # 2 + 2 steps equal 4 steps
    train(make_config(tmp_path / "b", steps=2, slimmable=True), data=data, progress=False)
    resumed = train(make_config(tmp_path / "b", steps=4, slimmable=True), resume=True, data=data, progress=False)
    a, b = (torch.load(p, weights_only=True) for p in (path, resumed))
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])


def test_warm_start_from_a_tinyunet(tmp_path):
    data = make_data()
    plain = train(make_config(tmp_path / "plain", steps=2), data=data, progress=False)
    path = train(make_config(tmp_path / "slim", steps=1, slimmable=True, init=str(plain), lr=1e-12, warmup=0),
                 data=data, progress=False)
    before, after = load_checkpoint(plain).model, load_checkpoint(path).model
    x, t = torch.randn(2, 1, 32, 32, generator=gen(0)), torch.tensor([500, 5])
    with torch.no_grad():
        torch.testing.assert_close(after(x, t), before(x, t), rtol=1e-4, atol=1e-4)  # lr ≈ 0: the warm start
    assert isinstance(build_model(after.config), SlimmableTinyUNet) and not isinstance(build_model(before.config),
                                                                                        SlimmableTinyUNet)
