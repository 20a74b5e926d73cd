"""`stepdrop.tables` and `stepdrop.plots`: report.json/csv/md and the PNG plots, from a small synthetic report."""

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from stepdrop.plots import (_film_columns, pareto_front, plot_cost_curves, plot_film_strip, plot_sample_grid,
                            plot_timestep_barcode)
from stepdrop.tables import REPORT_COLUMNS, render_markdown, write_report

T = 100


def _cell(solver, policy, budget, fid, *, reference=False, stochastic=False, ci=1.0, **extra):
    stride = T // budget
    rows = [list(range(T - 1, -1, -stride))[:budget] for _ in range(3)]
    if stochastic:
        rows = [[t - i for t in row] if i else row for i, row in enumerate(rows)]
    histogram = [0] * T
    for row in rows:
        for t in row:
            histogram[t] += 1
    cell = {
        "label": f"{solver}:{policy}-{budget}", "solver": solver, "policy": policy, "budget": budget, "eta": 0.0,
        "reference": reference, "num_samples": 64, "seed": 0,
        "nfe_mean": float(budget), "nfe_min": budget, "nfe_max": budget, "overhead_calls": 0,
        "gflops_per_sample": 0.5 * budget, "images_per_second": 1000.0 / budget, "wall_time_s": 0.064 * budget,
        "peak_memory_mb": 12.5,
        "fid": fid, "fid_ci": None if fid is None else [fid - ci, fid + ci], "kid": 0.004, "kid_std": 0.001,
        "precision": 0.71, "recall": 0.52, "classifier_score": 8.25,
        "timesteps": rows, "timestep_histogram": histogram,
    }
    cell.update(extra)
    return cell


def _report(cells=None):
    if cells is None:
        cells = [
            _cell("ddim", "uniform", 10, 30.0), _cell("ddim", "uniform", 25, 20.0),
            _cell("ddim", "stepdrop", 10, 25.0), _cell("ddim", "stepdrop", 25, None),
            _cell("ddim", "importance", 10, 29.5, stochastic=True), _cell("ddim", "importance", 25, 12.0,
                                                                          stochastic=True),
            _cell("ddpm", "uniform", 100, 8.0, reference=True),
        ]
    meta = {"model": "tiny-mnist", "dataset": "mnist", "reference": {"split": "test", "num_images": 10000,
            "extractor": "inception-v3-compat"}, "seed": 0, "num_samples": 64, "clip": 1.0, "device": "cpu",
            "torch": torch.__version__, "gflops_per_call": 0.5, "created": "2025-01-01T00:00:00",
            "command": "stepdrop compare --budgets 10,25",
            "interval": "95 % bootstrap over samples, 200 resamples"}
    return {"meta": meta, "cells": cells}


def _assert_png(path):
    assert path.name.endswith(".png") and path.exists()
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()


def _no_temp_files(folder):
    return not [p for p in folder.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]


def test_write_report_round_trips_and_creates_folder(tmp_path):
    report = _report()
    out = tmp_path / "a" / "b"
    paths = write_report(report, out)
    assert set(paths) == {"json", "csv", "md"} and all(p.parent == out for p in paths.values())
    assert json.loads(paths["json"].read_text()) == report
    with open(paths["csv"], newline="") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == REPORT_COLUMNS
    assert len(rows) == 1 + len(report["cells"]) and all(len(r) == len(REPORT_COLUMNS) for r in rows)
    by_label = {r[0]: dict(zip(REPORT_COLUMNS, r)) for r in rows[1:]}
    assert by_label["ddim:uniform-25"]["fid_ci_low"] == "19.0" and by_label["ddim:uniform-25"]["fid_ci_high"] == "21.0"
    assert by_label["ddim:stepdrop-25"]["fid"] == "" and by_label["ddim:stepdrop-25"]["fid_ci_low"] == ""
    assert paths["md"].read_text() == render_markdown(report)
    assert _no_temp_files(tmp_path)


def test_failed_write_keeps_previous_file_and_leaves_no_temp(tmp_path):
    write_report(_report(), tmp_path)
    before = (tmp_path / "report.json").read_bytes()
    broken = _report()
    broken["meta"]["model"] = object()
    with pytest.raises(TypeError):
        write_report(broken, tmp_path)
    assert (tmp_path / "report.json").read_bytes() == before
    assert _no_temp_files(tmp_path)


def test_a_write_that_fails_halfway_keeps_the_previous_report(tmp_path, monkeypatch):
    """The new text reaches the disk as a complete temporary file; then the move onto the old report fails."""
    import stepdrop._io as io_module

    write_report(_report(), tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in ("report.json", "report.csv", "report.md")}
    real_replace = io_module.os.replace

    def replace_then_fail(src, dst):  # the temp file is complete; the move onto the report fails
        assert Path(src).read_bytes() and Path(src).parent == tmp_path
        raise OSError("disk gone")

    monkeypatch.setattr(io_module.os, "replace", replace_then_fail)
    changed = _report()
    changed["meta"]["model"] = "another model"
    with pytest.raises(OSError, match="disk gone"):
        write_report(changed, tmp_path)
    monkeypatch.setattr(io_module.os, "replace", real_replace)
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert _no_temp_files(tmp_path)


def test_markdown_content():
    report = _report()
    md = render_markdown(report)
    for cell in report["cells"]:
        assert cell["label"] in md
    for text in ("tiny-mnist", "mnist", "10000 images", "inception-v3-compat", "bootstrap", "stepdrop compare",
                 "classifier score", "FID [95 % CI]", "KID×1e3 ± std", "biased upward", "<details>", "(reference)"):
        assert text in md
    assert "IS " not in md and "Inception Score " not in md
    stepdrop_25 = next(line for line in md.splitlines() if line.startswith("| ddim:stepdrop-25"))
    assert "| – |" in stepdrop_25  # FID not yet evaluated
    assert "30.00 [29.00, 31.00]" in md and "4.00 ± 1.00" in md
    # pilot evaluations are shown per generated sample (96 over 64 samples), not as a per-run count
    piloted = _report([_cell("ddim", "gradient_aware", 10, 20.0, overhead_calls=3, overhead_samples=96)])
    assert "10.0 (10–10) + 1.5 pilot" in render_markdown(piloted)
    # sorted by policy, then budget
    order = [line.split(" | ")[0][2:] for line in md.splitlines() if line.startswith("| ddim:") or
             line.startswith("| ddpm:")]
    assert order == ["ddim:importance-10", "ddim:importance-25", "ddim:stepdrop-10", "ddim:stepdrop-25",
                     "ddim:uniform-10", "ddim:uniform-25", "ddpm:uniform-100 (reference)"]
    # deterministic plans list their first row; per-sample plans are not listed
    details = md[md.index("<details>"):]
    assert "`ddim:uniform-10` (10 calls): 99, 89, 79" in details
    assert "ddim:importance" not in details
    # a cell flagged per-sample (from every sample, not only the recorded rows) is not listed either
    flagged = _report([_cell("ddim", "uniform", 10, 30.0), _cell("ddim", "adaptive", 10, 25.0, per_sample_plans=True)])
    assert "ddim:adaptive" not in render_markdown(flagged).split("<details>")[1]


def test_consecutive_timesteps_are_written_as_ranges():
    from stepdrop.tables import _timestep_text

    assert _timestep_text(list(range(999, -1, -1))) == "999…0"
    assert _timestep_text([20, 11, 8, 7, 6, 5]) == "20, 11, 8…5"
    assert _timestep_text([9, 8, 7, 3, 2, 1, 0]) == "9, 8, 7, 3…0"  # a run of three stays as it is
    assert _timestep_text([999]) == "999" and _timestep_text([]) == ""
    ddpm = _report([_cell("ddpm", "uniform", 100, 8.0, timesteps=[list(range(99, -1, -1))])])
    assert "`ddpm:uniform-100` (100 calls): 99…0" in render_markdown(ddpm)


def test_markdown_inception_score_column_only_when_measured():
    assert "IS ± std" not in render_markdown(_report())
    with_is = _report([_cell("ddim", "uniform", 10, 30.0, inception_score=3.21, inception_score_std=0.05)])
    md = render_markdown(with_is)
    assert "IS ± std" in md and "| 3.21 ± 0.05 | 8.25 |" in md


def test_markdown_budget_verdicts():
    md = render_markdown(_report())
    b10 = next(line for line in md.splitlines() if line.startswith("- **Budget 10**"))
    b25 = next(line for line in md.splitlines() if line.startswith("- **Budget 25**"))
    assert "`ddim:stepdrop-10`" in b10 and b10.endswith("separated.")  # [24, 26] vs [29, 31]
    assert "`ddim:importance-25`" in b25 and b25.endswith("separated.")
    close = _report([_cell("ddim", "uniform", 10, 30.0), _cell("ddim", "stepdrop", 10, 29.5)])
    line = next(x for x in render_markdown(close).splitlines() if x.startswith("- **Budget 10**"))
    assert line.endswith("within the interval.")
    alone = _report([_cell("ddim", "uniform", 10, 30.0)])
    assert "uniform DDIM itself has the lowest FID" in render_markdown(alone)
    no_ci = _report([_cell("ddim", "uniform", 10, 30.0), _cell("ddim", "stepdrop", 10, 20.0, fid_ci=None)])
    assert "no interval to compare" in render_markdown(no_ci)
    # a cell that counted more calls than its budget label is named, not ranked
    over = _report([_cell("ddim", "uniform", 10, 30.0), _cell("ddim", "stepdrop", 10, 20.0, nfe_mean=12.5)])
    line = next(x for x in render_markdown(over).splitlines() if x.startswith("- **Budget 10**"))
    assert "uniform DDIM itself has the lowest FID" in line and "`ddim:stepdrop-10` (12.5 calls)" in line


def test_pareto_front():
    points = [(10, 5), (20, 6), (15, 7), (30, 9), (5, 4), (30, 10), (20, 6), (40, math.nan)]
    assert pareto_front(points) == [4, 0, 1, 3]
    assert pareto_front([]) == []
    assert pareto_front([(1.0, 1.0)]) == [0]
    assert pareto_front([(1, 1), (2, 2), (3, 0)]) == [2]  # one point dominates all


def test_cost_curves(tmp_path):
    paths = plot_cost_curves(_report(), tmp_path / "plots")
    assert [p.name for p in paths] == ["fid_vs_nfe.png", "fid_vs_gflops.png", "fid_vs_throughput.png"]
    for path in paths:
        _assert_png(path)
    assert _no_temp_files(tmp_path)


def test_cost_curves_nothing_plottable(tmp_path):
    unevaluated = _report([_cell("ddim", "uniform", 10, None)])
    assert plot_cost_curves(unevaluated, tmp_path) == []
    assert plot_cost_curves(_report([]), tmp_path) == []
    assert list(tmp_path.iterdir()) == []


def test_timestep_barcode(tmp_path):
    report = _report()
    path = plot_timestep_barcode(report, tmp_path, budget=25)  # deterministic and per-sample rows
    assert path.name == "timestep_barcode.png"
    _assert_png(path)
    assert plot_timestep_barcode(report, tmp_path, budget=7) is None
    only_stochastic = _report([_cell("ddim", "importance", 10, 1.0, stochastic=True)])
    _assert_png(plot_timestep_barcode(only_stochastic, tmp_path / "s", budget=10))


def test_sample_grid(tmp_path):
    g = torch.Generator().manual_seed(0)
    grids = {"ddim:uniform-10": torch.rand(10, 1, 8, 8, generator=g) * 2 - 1,
             "ddim:stepdrop-10": torch.rand(10, 1, 8, 8, generator=g) * 2 - 1}
    _assert_png(plot_sample_grid(grids, tmp_path))
    rgb = {"rgb": torch.rand(3, 3, 8, 8, generator=g) * 4 - 2}  # out of range: clamped
    path = plot_sample_grid(rgb, tmp_path / "rgb", nrow=8)
    assert path.name == "samples_same_seed.png"
    _assert_png(path)
    with pytest.raises(ValueError, match="empty"):
        plot_sample_grid({}, tmp_path)


def test_sample_grid_margins_do_not_grow_with_rows(tmp_path):
    """A 26-cell study once rendered with 4 inches of blank page above its first row."""
    import numpy as np

    g = torch.Generator().manual_seed(0)

    def first_image_row(rows):
        """Pixels from the top of the PNG to the first line that is mostly sample (noise) pixels."""
        grids = {f"cell-{i}": torch.rand(8, 1, 32, 32, generator=g) * 2 - 1 for i in range(rows)}
        with Image.open(plot_sample_grid(grids, tmp_path / str(rows))) as image:
            grey = np.asarray(image.convert("L"))
        return int(np.argmax((grey < 200).mean(axis=1) > 0.3))

    few, many = first_image_row(3), first_image_row(26)
    assert 0 < few and abs(many - few) <= 2, (few, many)


def test_film_strip(tmp_path):
    frames = [(t, torch.zeros(6, 1, 8, 8).uniform_(-1, 1)) for t in range(99, -1, -7)]
    path = plot_film_strip(frames, tmp_path, "ddim:uniform-15")
    assert path.name == "film_strip.png"
    _assert_png(path)
    columns = _film_columns(len(frames))
    assert len(columns) == 10 and columns[0] == 0 and columns[-1] == len(frames) - 1
    assert columns == sorted(set(columns))
    assert _film_columns(3) == [0, 1, 2]
    with pytest.raises(ValueError, match="empty"):
        plot_film_strip([], tmp_path, "x")


def test_empty_report(tmp_path):
    report = _report([])
    md = render_markdown(report)
    assert "No cells" in md and "tiny-mnist" in md
    paths = write_report(report, tmp_path)
    with open(paths["csv"], newline="") as f:
        assert list(csv.reader(f)) == [list(REPORT_COLUMNS)]
    assert plot_cost_curves(report, tmp_path) == []
    assert plot_timestep_barcode(report, tmp_path) is None


def _scored(policy, budget, fid, ci, solver="ddim", nfe=None, pilot=0):
    return dict(label=f"{solver}:{policy}-{budget}", solver=solver, policy=policy, budget=budget, reference=False,
                fid=fid, fid_ci=ci, nfe_mean=float(budget if nfe is None else nfe), num_samples=100,
                overhead_samples=pilot)


def test_targets_are_checked_from_the_numbers():
    from stepdrop.tables import _target_lines

    cells = [
        _scored("uniform", 10, 50.0, [48, 52]), _scored("uniform", 20, 40.0, [38, 42]),
        _scored("uniform", 25, 35.0, [33, 37]), _scored("uniform", 50, 30.0, [28, 32]),
        _scored("quadratic", 10, 39.0, [37, 41]), _scored("quadratic", 20, 30.0, [29, 31]),
        _scored("quadratic", 25, 29.0, [28, 30]), _scored("quadratic", 50, 27.0, [26, 27.5]),
        _scored("stepdrop", 10, 60.0, [55, 65]), _scored("stepdrop", 25, 36.0, [30, 40]),
    ]
    lines = _target_lines(cells)
    assert ": met — best within 25 counted calls is `ddim:quadratic-25`" in lines[0]
    assert ": met — best within 10 counted calls is `ddim:quadratic-10` (10.0 calls)" in lines[1]
    assert lines[2].endswith("met by `ddim:quadratic`.")
    # counted calls, not budget labels: a "10" cell that drew 11 calls per sample does not count at 10,
    # nor does one whose pilot evaluations (50 over 100 samples) push it past 10
    for over in (_scored("stepdrop", 10, 20.0, [19, 21], nfe=11.0), _scored("stepdrop", 10, 20.0, [19, 21], pilot=50)):
        assert "`ddim:quadratic-10`" in _target_lines([*cells[:8], over])[1]
    drawn = [*cells[:4], *(_scored("stepdrop", b, f, [f - 1, f + 1], nfe=b - 1) for b, f in
                           ((10, 30.0), (20, 20.0), (25, 20.0), (50, 20.0)))]
    assert _target_lines(drawn)[2].endswith("met by `ddim:stepdrop`.")
    drawn[4] = _scored("stepdrop", 10, 30.0, [29, 31], nfe=10.5)
    assert _target_lines(drawn)[2].endswith("not met.")
    # without intervals the third target cannot be judged
    no_ci = [dict(c, fid_ci=None) for c in cells]
    assert _target_lines(no_ci)[2].endswith("not measured (no FID intervals).")
    # quadratic-50's interval touching uniform's: no longer "more than the interval"
    cells[7] = _scored("quadratic", 50, 29.0, [28, 30])
    assert _target_lines(cells)[2].endswith("not met.")
    assert ": not met — " in _target_lines([*cells[:4], _scored("stepdrop", 25, 31.0, [30, 32])])[0]
    assert "not measured" in _target_lines(cells[:1])[0]


def test_only_cells_with_the_reports_sample_count_are_ranked():
    """FID falls as the sample count grows: a 10k-sample cell must not win on its count."""
    from stepdrop.tables import _budget_lines, _target_lines

    cells = [_scored("uniform", 25, 35.0, [33, 37]), _scored("quadratic", 25, 34.0, [33, 35]),
             _scored("uniform", 50, 30.0, [28, 32]),
             dict(_scored("stepdrop", 25, 20.0, [19, 21]), label="ddim:stepdrop-25@10000", num_samples=10000)]
    (line, _) = _budget_lines(cells, 100)
    assert "best by FID is `ddim:quadratic-25`" in line and "within the interval" in line
    assert line.endswith("Not ranked, another sample count: `ddim:stepdrop-25@10000` (10000 samples).")
    assert "`ddim:stepdrop-25@10000`" in _budget_lines(cells, None)[0].split(";")[0]  # no count given: all ranked
    assert ": not met — best within 25 counted calls is `ddim:quadratic-25`" in _target_lines(cells, 100)[0]
    assert ": met — best within 25 counted calls is `ddim:stepdrop-25@10000`" in _target_lines(cells, None)[0]
    alone = _budget_lines([cells[2], dict(cells[3], budget=50)], 100)
    assert alone[0].startswith("- **Budget 50**: best by FID is `ddim:uniform-50`")
    only_other = _budget_lines([dict(cells[3], budget=10)], 100)
    assert only_other == ["- **Budget 10**: no cell with 100 samples to rank. Not ranked, another sample count: "
                          "`ddim:stepdrop-25@10000` (10000 samples)."]


def test_a_reference_is_never_the_uniform_baseline():
    from stepdrop.tables import _budget_lines

    reference = dict(_scored("uniform", 25, 50.0, [49, 51]), label="ddim-25@8", reference=True)
    (line,) = _budget_lines([reference, _scored("quadratic", 25, 34.0, [33, 35])], 100)
    assert "ddim-25@8" not in line and "no evaluated uniform DDIM cell at this budget" in line


def test_width_schedule_plot(tmp_path):
    from stepdrop.plots import plot_width_schedules

    assert plot_width_schedules({"cells": [{"label": "ddim-4", "widths": None}]}, tmp_path) is None
    report = {"cells": [{"label": "ddim:uniform-4+width(1,0.5,0.5,0.25)", "widths": [1.0, 0.5, 0.5, 0.25],
                         "timesteps": [[999, 749, 499, 249]], "fid": 30.0, "gflops_per_sample": 1.2}]}
    path = plot_width_schedules(report, tmp_path)
    assert path == tmp_path / "width_schedules.png"
    Image.open(path).verify()
