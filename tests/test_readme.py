"""The README's usage example runs exactly as written."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _usage_block() -> str:
    text = README.read_text()
    section = text.split("## Use", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_usage_example_runs_as_written(tmp_path):
    script = tmp_path / "usage.py"
    script.write_text(_usage_block())
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("torch.Size([8, 1, 16, 16]) [10, 10, 10, 10, 10, 10, 10, 10] 10")
    # StepDrop per sample: NFE counted per sample, mean near the budget
    nfe = [int(v) for v in re.search(r"\[(.*?)\]", lines[1]).group(1).split(",")]
    assert len(nfe) == 8 and all(n >= 1 for n in nfe)


def test_readme_cheaper_calls_example_runs_as_written(tmp_path):
    section = README.read_text().split("### Cheaper calls", 1)[1]
    script = tmp_path / "cheaper.py"
    script.write_text(re.search(r"```python\n(.*?)```", section, re.S).group(1))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    calls, flops, mixres = out.stdout.strip().splitlines()
    assert calls == "{'full': [4, 4, 4, 4], 'shallow': [8, 8, 8, 8]}"
    assert flops.startswith("{'full': 0.49") and "'shallow': 0.06" in flops
    assert mixres == "(4, 1, 32, 32) ('res0.5', 'res0.5', 'res0.5', 'full', 'full', 'full', 'full', 'full', 'full', 'full')"


# ----------------------------------------------------------------------------- the diffusers section
def _diffusers_section() -> str:
    text = README.read_text()
    return text.split("### diffusers", 1)[1].split("\n## ", 1)[0]


def _diffusers_block() -> str:
    return re.search(r"```python\n(.*?)```", _diffusers_section(), re.S).group(1)


def test_readme_diffusers_snippet_defines_every_name_it_uses():
    """Every name the snippet reads is imported or assigned before it is read (the snippet once
    used ``pipe`` without creating it)."""
    import ast
    import builtins

    bound = set(dir(builtins))
    for stmt in ast.parse(_diffusers_block()).body:
        loads = [n.id for n in ast.walk(stmt) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)]
        missing = sorted(set(loads) - bound)
        assert not missing, f"line {stmt.lineno} uses {missing} before defining them"
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            bound |= {(a.asname or a.name).split(".")[0] for a in stmt.names}
        for node in ast.walk(stmt):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                bound.add(node.id)


def test_readme_diffusers_snippet_runs(monkeypatch):
    """The snippet, run as written, with the Hub download replaced by a tiny random UNet."""
    import pytest
    import torch

    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    ).eval()
    requested = []

    def from_pretrained(name, *args, **kwargs):
        requested.append(name)
        return diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler())

    monkeypatch.setattr(diffusers.DDPMPipeline, "from_pretrained", staticmethod(from_pretrained))
    scope: dict = {}
    exec(compile(_diffusers_block(), "README.md:diffusers", "exec"), scope)
    assert requested == ["google/ddpm-cifar10-32"]
    assert len(scope["images"]) == 1 and scope["images"][0].size == (8, 8)
    scheduler = scope["pipe"].scheduler
    assert type(scheduler).__name__ == "StepDropScheduler" and scheduler.num_inference_steps == 25


def test_readme_diffusers_policy_list_is_what_the_scheduler_accepts():
    """The README lists exactly the policies StepDropScheduler runs, and exactly the ones it
    refuses (and says FusedSampler runs those)."""
    import pytest

    pytest.importorskip("diffusers")
    from stepdrop.diffusers_scheduler import StepDropScheduler
    from stepdrop.policies import POLICIES

    accepted, refused = [], []
    for name in POLICIES:
        try:
            StepDropScheduler(policy=name)
            accepted.append(name)
        except ValueError:
            refused.append(name)
    for name in ("stepdrop", "stepdrop_exact"):  # stochastic: per batch only
        StepDropScheduler(policy=name, policy_kwargs={"per_sample": False}, plan_seed=0)
        with pytest.raises(ValueError, match="per_sample"):
            StepDropScheduler(policy=name, policy_kwargs={"per_sample": True})

    section = " ".join(_diffusers_section().split("```")[2].split())
    runs, raises = section.split("raises `ValueError`", 1)
    assert "any deterministic policy" not in section
    for name in accepted:
        assert f"`{name}`" in runs and f"`{name}`" not in raises, name
    for name in refused:
        assert f"`{name}`" in raises and f"`{name}`" not in runs, name
    assert "`per_sample=False`" in runs and "`per_sample=True`" in raises and "`plan_seed" in runs
    assert "`FusedSampler`" in raises


def test_readme_models_snippet_runs(monkeypatch):
    """The Models section's pipeline snippet, run as written, with the Hub download replaced by a
    tiny random UNet and a v-prediction scheduler: the sampler takes the scheduler's type."""
    import pytest
    import torch

    diffusers = pytest.importorskip("diffusers")
    section = README.read_text().split("### Models", 1)[1].split("\n### ", 1)[0]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    ).eval()
    scheduler = diffusers.DDIMScheduler(prediction_type="v_prediction")
    monkeypatch.setattr(diffusers.DDIMPipeline, "from_pretrained",
                        staticmethod(lambda name: diffusers.DDIMPipeline(unet=unet, scheduler=scheduler)))
    scope: dict = {}
    exec(compile(block, "README.md:models", "exec"), scope)
    assert scope["model"].prediction_type == "v_prediction"
    assert scope["images"].shape == (16, 3, 8, 8) and scope["stats"].nfe.tolist() == [10] * 16
