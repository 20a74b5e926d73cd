"""DDSM's width search (stepdrop.width_search): deterministic, resumable, honest about its cost."""

from __future__ import annotations

import json

import pytest
import torch

from stepdrop import FusedSampler, NoiseSchedule
from stepdrop.models import SlimmableTinyUNet
from stepdrop.variants import parse_calls
from stepdrop.width_search import WidthSearch, _first_population, _next_population, expand_bands, search_widths

SCHEDULE = NoiseSchedule.linear(1000)
WIDTHS = (1.0, 0.75, 0.5, 0.25)


def test_bands_expand_to_calls():
    assert expand_bands((1.0, 0.5), 5) == (1.0, 1.0, 1.0, 0.5, 0.5)
    assert expand_bands((1.0, 0.5, 0.25), 3) == (1.0, 0.5, 0.25)
    assert expand_bands((0.75,), 4) == (0.75,) * 4


def test_populations_are_seeded_hold_the_uniform_widths_and_no_duplicates():
    search = WidthSearch(budget=6, population=8)
    first = _first_population(WIDTHS, search, torch.Generator().manual_seed(0))
    assert first[:4] == [[w] * 6 for w in WIDTHS] and len(first) == 8
    assert len({tuple(g) for g in first}) == 8
    assert first == _first_population(WIDTHS, search, torch.Generator().manual_seed(0))
    nxt = _next_population(first, WIDTHS, search, torch.Generator().manual_seed(1))
    assert nxt[:4] == first[:4] and len(nxt) == 8 and len({tuple(g) for g in nxt}) == 8
    assert all(w in WIDTHS for g in nxt for w in g)


def _model():
    torch.manual_seed(0)
    return SlimmableTinyUNet(in_channels=1, image_size=16, base_channels=16, channel_mults=(1, 2), num_res_blocks=1,
                             attention_resolutions=(), prediction_type="v_prediction").eval()


def test_search_writes_a_named_schedule_resumes_and_is_deterministic(tmp_path, monkeypatch):
    pytest.importorskip("torch_fidelity")
    from stepdrop import metrics

    monkeypatch.setenv("STEPDROP_CACHE", str(tmp_path / "cache"))
    model = _model()
    reference = metrics.extract_features(torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8,
                                                       generator=torch.Generator().manual_seed(0)))
    search = WidthSearch(budget=3, num_samples=4, batch_size=4, population=3, generations=2, lam=0.5, metric="fid")
    calls = []
    original = FusedSampler.sample
    monkeypatch.setattr(FusedSampler, "sample", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    result = search_widths(model, SCHEDULE, search, reference, tmp_path / "a", progress=False, log=lambda s: None)
    assert len(result["widths"]) == 3 and all(w in WIDTHS for w in result["widths"])
    assert result["fitness"] == pytest.approx(result["quality"] + 0.5 * result["gflops"])
    cost = result["search"]["cost"]
    assert cost["model_calls"] == 3 * len(calls) and cost["sample_evaluations"] == 3 * 4 * len(calls)
    assert result["search"]["individuals"] == len(calls)  # one sampler call (4 images) per individual
    saved = json.loads((tmp_path / "cache" / "widths" / "ddim-uniform-3.json").read_text())
    assert saved["widths"] == result["widths"]
    for name in ("widths.json", "generations.csv", "widths.png", "search_state.json"):
        assert (tmp_path / "a" / name).is_file()
    # the named schedule runs as a call variant
    plan = parse_calls("+width(@ddim-uniform-3)")
    assert list(plan.width.widths) == result["widths"] and plan.text == "+width(@ddim-uniform-3)"
    images, stats = FusedSampler(model, SCHEDULE, calls=plan).sample(2, "uniform", budget=3)
    assert stats.variants == tuple("full" if w == 1.0 else f"w{w:g}" for w in result["widths"])
    # a finished search resumes without a single new evaluation; another folder gives the same result
    calls.clear()
    again = search_widths(model, SCHEDULE, search, reference, tmp_path / "a", progress=False, log=lambda s: None)
    assert calls == [] and again["widths"] == result["widths"]
    other = search_widths(model, SCHEDULE, search, reference, tmp_path / "b", progress=False, log=lambda s: None)
    assert other["widths"] == result["widths"] and other["history"] == result["history"]
    with pytest.raises(ValueError, match="holds a search with other settings"):
        search_widths(model, SCHEDULE, WidthSearch(budget=3, num_samples=4, population=4, generations=2), reference,
                      tmp_path / "a", progress=False, log=lambda s: None)


def test_bad_settings_and_names():
    with pytest.raises(ValueError, match=r"metric must be one of \('fid', 'kid'\)"):
        WidthSearch(metric="is")
    with pytest.raises(ValueError, match=r"bands must be in \[1, 25\]"):
        WidthSearch(bands=30)
    with pytest.raises(ValueError, match=r"width schedule @nope: no file"):
        parse_calls("+width(@nope)")


def test_a_plain_model_is_refused_and_the_cli_explains(capsys):
    from stepdrop import TinyUNet
    from stepdrop.cli import main

    plain = TinyUNet(in_channels=1, image_size=16, base_channels=16, channel_mults=(1, 2), num_res_blocks=1,
                     attention_resolutions=())
    with pytest.raises(ValueError, match="width needs a slimmable model"):
        search_widths(plain, SCHEDULE, WidthSearch(budget=2), torch.zeros(4, 2048), "unused", progress=False)
    with pytest.raises(SystemExit):
        main(["search-widths", "--help"])
    assert "DDSM" in capsys.readouterr().out
    # the shipped model is not slimmable: a clear error, exit status 2
    assert main(["search-widths", "--budget", "2", "--num-samples", "2", "--out", "/tmp/unused-search",
                 "--no-progress"]) == 2
    assert "width needs a slimmable model" in capsys.readouterr().err


def test_small_genome_spaces_and_unsearchable_policies():
    from stepdrop.width_search import _plan_columns

    # one band and four widths: four genomes exist, fewer than the population asked for
    first = _first_population(WIDTHS, WidthSearch(bands=1, budget=4, population=12), torch.Generator().manual_seed(0))
    assert sorted(first) == [[0.25], [0.5], [0.75], [1.0]]
    assert _plan_columns(WidthSearch(policy="quadratic", budget=7), SCHEDULE) == 7
    for policy, match in (("adaptive", "picks its steps online"), ("stepdrop", "draws its plans at random"),
                          ("stepdrop_per_sample", "draws its plans at random"),
                          ("gradient_aware", "cannot be width-searched here")):
        with pytest.raises(ValueError, match=match):
            _plan_columns(WidthSearch(policy=policy, budget=6), SCHEDULE)
