"""Models: TinyUNet and the diffusers adapter honour ``eps = model(x, t)`` with per-sample t."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from stepdrop.models import DiffusersUNetAdapter, TinyUNet, as_eps_model

# Small configurations so that the whole file runs in seconds on two CPU cores.
SMALL = dict(image_size=8, base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(4,))


def small_unet(**overrides) -> TinyUNet:
    torch.manual_seed(0)
    return TinyUNet(**{**SMALL, **overrides}).eval()


@pytest.mark.parametrize(
    "config",
    [
        dict(in_channels=1, image_size=28, base_channels=8, channel_mults=(1, 2, 2), attention_resolutions=(14,)),
        dict(in_channels=3, image_size=32, base_channels=8, channel_mults=(1, 2, 2), attention_resolutions=(16,)),
        dict(in_channels=3, image_size=16, base_channels=8, channel_mults=(1, 2), attention_resolutions=(),
             mid_attention=False),
        dict(in_channels=2, image_size=8, base_channels=12, channel_mults=(1,), num_res_blocks=1,
             attention_resolutions=(8,), num_heads=3, time_embed_dim=20, dropout=0.1),
        dict(in_channels=1, image_size=6, base_channels=5, channel_mults=(1, 3), num_res_blocks=1,
             attention_resolutions=(3,), num_heads=5),
    ],
)
def test_output_shape_equals_input_shape(config):
    model = TinyUNet(**config).eval()
    B = 3
    x = torch.randn(B, *model.sample_shape)
    assert model.sample_shape == (config["in_channels"], config["image_size"], config["image_size"])
    with torch.no_grad():
        eps = model(x, torch.tensor([0, 499, 999]))
    assert eps.shape == x.shape and eps.dtype == x.dtype
    assert torch.isfinite(eps).all()


def test_out_channels_and_dtype():
    model = small_unet(in_channels=1, out_channels=2).double()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        eps = model(x, torch.tensor([3, 7]))
    assert eps.shape == (2, 2, 8, 8) and eps.dtype == torch.float64


def test_default_config_runs():
    model = TinyUNet().eval()
    assert model.sample_shape == (3, 32, 32)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32), torch.tensor([10])).shape == (1, 3, 32, 32)


def test_timestep_forms_agree():
    model = small_unet()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        ref = model(x, torch.full((4,), 123, dtype=torch.int64))
        torch.testing.assert_close(model(x, 123), ref)
        torch.testing.assert_close(model(x, torch.tensor(123)), ref)
        torch.testing.assert_close(model(x, torch.full((4,), 123, dtype=torch.int32)), ref)


def test_per_sample_timesteps_give_per_sample_outputs():
    model = small_unet()
    x = torch.randn(1, 3, 8, 8).expand(4, -1, -1, -1).contiguous()
    with torch.no_grad():
        eps = model(x, torch.tensor([0, 10, 500, 999]))
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.allclose(eps[i], eps[j]), (i, j)


def test_samples_are_independent():
    """Output i depends only on (x_i, t_i): batch permutation permutes outputs; per-sample calls agree."""
    model = small_unet()
    torch.manual_seed(1)
    x = torch.randn(5, 3, 8, 8)
    t = torch.tensor([999, 3, 250, 3, 700])
    perm = torch.tensor([3, 0, 4, 1, 2])
    with torch.no_grad():
        eps = model(x, t)
        torch.testing.assert_close(model(x[perm], t[perm]), eps[perm], atol=1e-5, rtol=1e-5)
        for i in range(5):
            torch.testing.assert_close(model(x[i : i + 1], t[i : i + 1]), eps[i : i + 1], atol=1e-5, rtol=1e-5)


def test_config_round_trip():
    model = small_unet(in_channels=1, num_heads=2, dropout=0.1, time_embed_dim=24)
    config = json.loads(json.dumps(model.config))  # a plain JSON-able dict
    clone = TinyUNet.from_config(config).eval()
    assert clone.config == model.config
    assert clone.num_parameters() == model.num_parameters()
    clone.load_state_dict(model.state_dict())
    x = torch.randn(3, 1, 8, 8)
    t = torch.tensor([1, 2, 900])
    with torch.no_grad():
        torch.testing.assert_close(clone(x, t), model(x, t), atol=0, rtol=0)
    # Editing the returned dict does not touch the model.
    model.config["channel_mults"].append(4)
    assert model.config["channel_mults"] == [1, 2]


def test_zero_init_output():
    model = small_unet(zero_init_output=True)
    with torch.no_grad():
        assert (model(torch.randn(2, 3, 8, 8), torch.tensor([5, 6])) == 0).all()


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(image_size=30, channel_mults=(1, 2, 2)), "image_size"),
        (dict(image_size=32, attention_resolutions=(12,)), "attention_resolutions"),
        (dict(channel_mults=()), "channel_mults"),
        (dict(channel_mults=(1, 0)), r"channel_mults\[1\]"),
        (dict(base_channels=8, num_heads=3), "num_heads"),
        (dict(dropout=1.0), "dropout"),
        (dict(base_channels=0), "base_channels"),
        (dict(num_res_blocks=0), "num_res_blocks"),
        (dict(in_channels=0), "in_channels"),
        (dict(out_channels=0), "out_channels"),
        (dict(time_embed_dim=0), "time_embed_dim"),
    ],
)
def test_bad_config_raises_value_error(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        TinyUNet(**{**SMALL, **kwargs})


def test_bad_config_types_and_keys():
    with pytest.raises(TypeError, match="channel_mults"):
        TinyUNet(channel_mults="12")
    with pytest.raises(TypeError, match="in_channels"):
        TinyUNet(in_channels=True)
    with pytest.raises(ValueError, match="unknown keys"):
        TinyUNet.from_config({**SMALL, "channels": 3})


def test_bad_inputs_raise():
    model = small_unet()
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([1, 2])
    for bad_x in (torch.randn(3, 8, 8), torch.randn(2, 1, 8, 8), torch.randn(2, 3, 16, 16)):
        with pytest.raises(ValueError, match=r"^x must have shape \[B, 3, 8, 8\]"):
            model(bad_x, t)
    for bad_t in (torch.tensor([1, 2, 3]), torch.tensor([[1], [2]])):
        with pytest.raises(ValueError, match=r"^t must have shape \[B\] = \[2\]"):
            model(x, bad_t)
    with pytest.raises(TypeError, match="^t "):
        model(x, "10")
    with pytest.raises(TypeError, match="^x "):
        model(x.long(), t)


def test_gradients_flow():
    model = small_unet(dropout=0.1).train()
    x = torch.randn(3, 3, 8, 8, requires_grad=True)
    loss = model(x, torch.tensor([1, 50, 999])).square().mean()
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert model.time_mlp[0].weight.grad.abs().sum() > 0


def test_models_package_does_not_import_diffusers():
    """diffusers is optional: no module of stepdrop.models imports it at module level."""
    import stepdrop.models as pkg

    for path in Path(pkg.__file__).parent.glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n.split(".")[0] == "diffusers" for n in names), f"{path.name} imports diffusers"


def test_as_eps_model_passthrough_and_errors():
    model = small_unet()
    assert as_eps_model(model) is model

    def fn(x, t):
        return x

    assert as_eps_model(fn) is fn
    with pytest.raises(TypeError, match="^model "):
        as_eps_model(5)
    with pytest.raises(TypeError, match="^unet "):
        DiffusersUNetAdapter(nn.Conv2d(3, 3, 1))


# ---------------------------------------------------------------------- diffusers


def _diffusers_unet(**overrides):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    kwargs = dict(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    return diffusers.UNet2DModel(**{**kwargs, **overrides}).eval()


def test_diffusers_adapter_matches_unet():
    unet = _diffusers_unet()
    adapter = as_eps_model(unet)
    assert isinstance(adapter, DiffusersUNetAdapter) and adapter.unet is unet
    assert as_eps_model(adapter) is adapter
    assert adapter.sample_shape == (3, 16, 16)
    x = torch.randn(3, 3, 16, 16)
    t = torch.tensor([0, 400, 999])
    with torch.no_grad():
        ref = unet(x, t).sample
        torch.testing.assert_close(adapter(x, t), ref, atol=0, rtol=0)
        torch.testing.assert_close(adapter(x, 7), unet(x, torch.full((3,), 7)).sample)
    with pytest.raises(ValueError, match=r"^t must have shape"):
        adapter(x, torch.tensor([1, 2]))


def test_diffusers_adapter_rejects_non_eps_shapes():
    with pytest.raises(ValueError, match="^unet .*out_channels=6"):
        DiffusersUNetAdapter(_diffusers_unet(out_channels=6))


def test_tiny_unet_matches_diffusers_parameter_count():
    """Same architecture as diffusers' UNet2DModel with attention blocks at the chosen resolution."""
    unet = _diffusers_unet(
        sample_size=16,
        block_out_channels=(8, 16, 16),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    )
    ours = TinyUNet(image_size=16, base_channels=8, channel_mults=(1, 2, 2), num_res_blocks=2,
                    attention_resolutions=(8,), norm_groups=8)
    assert ours.num_parameters() == sum(p.numel() for p in unet.parameters())


# ---------------------------------------------------------------------- shared helpers


def test_diffusers_adapter_rejects_bool_and_complex_timesteps():
    """The adapter normalises t with the same helper as TinyUNet, so a bool (or complex) t is a
    TypeError instead of reaching the UNet (diffusers would embed True/False as timesteps 1/0)."""
    adapter = as_eps_model(_diffusers_unet())
    x = torch.randn(2, 3, 16, 16)
    for bad in (torch.tensor([True, False]), torch.tensor(True), torch.tensor([1 + 0j, 2 + 0j])):
        with pytest.raises(TypeError, match=r"^t must be an integer"):
            adapter(x, bad)
    with pytest.raises(TypeError, match=r"^t "):
        adapter(x, True)


def test_as_timestep_vector_forms_and_errors():
    from stepdrop.models import adapters, tiny_unet
    from stepdrop.models._timesteps import as_timestep_vector

    assert adapters.as_timestep_vector is as_timestep_vector and tiny_unet.as_timestep_vector is as_timestep_vector
    for t, dtype in ((7, torch.int64), (torch.tensor(7), torch.int64), (torch.tensor([7, 7, 7], dtype=torch.int32), torch.int32),
                     (7.5, torch.float32)):
        v = as_timestep_vector(t, 3, "cpu")
        assert v.shape == (3,) and v.dtype == dtype and (v == (7.5 if dtype == torch.float32 else 7)).all()
    for bad in (torch.tensor([True, False, True]), torch.zeros(3, dtype=torch.complex64)):
        with pytest.raises(TypeError, match=r"^t must be an integer"):
            as_timestep_vector(bad, 3, "cpu")
    for bad in (True, "7", None):
        with pytest.raises(TypeError, match=r"^t "):
            as_timestep_vector(bad, 3, "cpu")
    for bad in (torch.zeros(2, dtype=torch.int64), torch.zeros(3, 1, dtype=torch.int64)):
        with pytest.raises(ValueError, match=r"^t must have shape \[B\] = \[3\]"):
            as_timestep_vector(bad, 3, "cpu")


def test_tiny_unet_bool_settings_raise_type_error_by_name():
    for name in ("mid_attention", "zero_init_output"):
        with pytest.raises(TypeError, match=f"^{name} must be a bool"):
            TinyUNet(**{**SMALL, name: 1})
