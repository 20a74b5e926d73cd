"""Render a ``stepdrop compare`` report: report.json, report.csv, report.md and PNG plots.

The input is the report dict built by :mod:`stepdrop.compare` (``{"meta": {...}, "cells":
[...]}``; the schema is in that module). Optional metrics may be ``None`` (a cell not yet
evaluated, KID skipped) and are shown as "–". Every file is written atomically
(:func:`stepdrop._io.atomic_write`), so an interrupted run never leaves a half-written report.

Plots use matplotlib's object API (``matplotlib.figure.Figure`` rendered by the Agg canvas):
no pyplot state, no display needed, and each figure is freed once it is saved.

The in-domain classifier's Inception-Score-style number is always called "classifier score"
here: it is not the Inception Score of the literature (different network, different data).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

from torch import Tensor

from stepdrop._io import atomic_write_bytes

__all__ = [
    "REPORT_COLUMNS",
    "calls_per_sample",
    "write_report",
    "render_csv",
    "render_markdown",
    "pareto_front",
    "plot_cost_curves",
    "plot_timestep_barcode",
    "plot_sample_grid",
    "plot_film_strip",
]

REPORT_COLUMNS: tuple[str, ...] = (
    "label", "solver", "policy", "budget", "eta", "reference", "num_samples", "seed",
    "nfe_mean", "nfe_min", "nfe_max", "overhead_calls", "gflops_per_sample",
    "images_per_second", "wall_time_s", "peak_memory_mb",
    "fid", "fid_ci_low", "fid_ci_high", "kid", "kid_std", "precision", "recall", "inception_score",
    "inception_score_std", "classifier_score",
)
"""Column order of report.csv: every scalar field of a cell, ``fid_ci`` split in two."""

MISSING = "–"
_DPI = 130
_MAX_FILM_COLUMNS = 10
_MAX_FILM_ROWS = 4


# ----------------------------------------------------------------------------- small helpers

def _plain(value: Any) -> Any:
    """A JSON/CSV-ready value: tensors and numpy scalars/arrays become Python numbers/lists."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist"):  # torch.Tensor, numpy array or scalar
        return value.tolist()
    raise TypeError(f"cannot write a {type(value).__name__} into a report")


def _is_number(value: Any) -> bool:
    return value is not None and not isinstance(value, bool) and math.isfinite(float(value))


def _fmt(value: Any, spec: str) -> str:
    """``value`` formatted with ``spec``; ``None`` as "–"."""
    if value is None:
        return MISSING
    return format(float(value), spec)


def _ci(cell: dict[str, Any]) -> tuple[float, float] | None:
    ci = cell.get("fid_ci")
    if ci is None or len(ci) != 2 or not all(_is_number(v) for v in ci):
        return None
    return float(ci[0]), float(ci[1])


def _is_deterministic(cell: dict[str, Any]) -> bool:
    """True when every sample ran the same timestep list: the cell's ``per_sample_plans`` flag
    (set from every sample of every batch) is False, and every recorded row is the same."""
    if cell.get("per_sample_plans"):
        return False
    rows = [list(map(int, row)) for row in cell.get("timesteps") or []]
    return bool(rows) and all(row == rows[0] for row in rows[1:])


def _pilot_per_sample(cell: dict[str, Any]) -> float:
    """Pilot evaluations (a gradient-aware policy's probes) per generated sample."""
    return float(cell.get("overhead_samples") or 0) / max(int(cell.get("num_samples") or 1), 1)


def calls_per_sample(cell: dict[str, Any]) -> float:
    """What a sample of the cell cost in model calls, counted: its mean NFE plus the pilot
    evaluations per generated sample."""
    return float(cell["nfe_mean"]) + _pilot_per_sample(cell)


def _within(cell: dict[str, Any], calls: int) -> bool:
    """Whether the cell's counted cost per sample is at most ``calls`` (never its budget label)."""
    return _is_number(cell.get("nfe_mean")) and calls_per_sample(cell) <= calls + 1e-9


def _interval_level(meta: dict[str, Any]) -> str:
    """The confidence level named in ``meta["interval"]`` (e.g. "95 %"), default "95 %"."""
    m = re.search(r"(\d+(?:\.\d+)?)\s*%", str(meta.get("interval") or ""))
    return f"{m.group(1)} %" if m else "95 %"


def _sorted_cells(cells: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(cells, key=lambda c: (str(c["policy"]), int(c["budget"]), str(c["solver"]), str(c["label"])))


def _is_uniform_ddim(cell: dict[str, Any]) -> bool:
    return cell["solver"] == "ddim" and cell["policy"] == "uniform"


# ----------------------------------------------------------------------------- JSON / CSV / MD

def _csv_row(cell: dict[str, Any]) -> dict[str, Any]:
    ci = cell.get("fid_ci") or (None, None)
    row = {k: cell.get(k) for k in REPORT_COLUMNS}
    row["fid_ci_low"], row["fid_ci_high"] = ci[0], ci[1]
    return {k: (v if v is None or isinstance(v, (str, int, float)) else _plain(v)) for k, v in row.items()}


def render_csv(report: dict[str, Any]) -> str:
    """report.csv's text: a header of :data:`REPORT_COLUMNS`, then one row per cell (None → empty)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=REPORT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(_csv_row(c) for c in _sorted_cells(report.get("cells", [])))
    return buffer.getvalue()


def write_report(report: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``report.json`` (indent 2), ``report.csv`` and ``report.md`` into ``out_dir`` (created
    if missing), each atomically. Returns ``{"json": path, "csv": path, "md": path}``."""
    out = Path(out_dir)
    text = json.dumps(report, indent=2, default=_plain) + "\n"
    return {
        "json": atomic_write_bytes(out / "report.json", text.encode()),
        "csv": atomic_write_bytes(out / "report.csv", render_csv(report).encode()),
        "md": atomic_write_bytes(out / "report.md", render_markdown(report).encode()),
    }


def _md_escape(text: Any) -> str:
    return str(text).replace("|", "\\|")


def _fid_text(cell: dict[str, Any]) -> str:
    if cell.get("fid") is None:
        return MISSING
    ci = _ci(cell)
    return _fmt(cell["fid"], ".2f") + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def _table_row(cell: dict[str, Any], with_is: bool) -> str:
    label = _md_escape(cell["label"]) + (" (reference)" if cell.get("reference") else "")
    nfe = f"{_fmt(cell.get('nfe_mean'), '.1f')} ({cell.get('nfe_min', MISSING)}–{cell.get('nfe_max', MISSING)})"
    if cell.get("overhead_samples"):
        nfe += f" + {_pilot_per_sample(cell):.2g} pilot"
    kid = cell.get("kid")
    kid_text = MISSING if kid is None else f"{float(kid) * 1e3:.2f}"
    if kid is not None and cell.get("kid_std") is not None:
        kid_text += f" ± {float(cell['kid_std']) * 1e3:.2f}"
    values = [label, nfe, _fmt(cell.get("gflops_per_sample"), ".4g"), _fmt(cell.get("images_per_second"), ".1f"),
              _fid_text(cell), kid_text, _fmt(cell.get("precision"), ".3f"), _fmt(cell.get("recall"), ".3f")]
    if with_is:
        values.append(MISSING if cell.get("inception_score") is None else
                      f"{float(cell['inception_score']):.2f} ± {float(cell.get('inception_score_std') or 0):.2f}")
    values.append(_fmt(cell.get("classifier_score"), ".2f"))
    return "| " + " | ".join(values) + " |"


def _rankable(cells: list[dict[str, Any]], num_samples: Any) -> list[dict[str, Any]]:
    """The cells that may be ranked against each other: evaluated, not references, and drawn
    with the report's own sample count (FID's bias depends on it: a cell with more samples
    would win on the count alone). ``num_samples`` None: every count is taken."""
    return [c for c in cells if not c.get("reference") and _is_number(c.get("fid"))
            and (num_samples is None or c.get("num_samples") == num_samples)]


def _budget_lines(cells: list[dict[str, Any]], num_samples: Any = None) -> list[str]:
    """Per budget: the best non-reference cell by FID among those whose counted calls per
    sample stay within the budget, and whether its CI separates from uniform DDIM's at that
    budget (intervals that do not overlap). Cells over their budget, and cells with another
    sample count than ``num_samples``, are named, not ranked."""
    by_budget: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for cell in cells:
        by_budget[int(cell["budget"])].append(cell)
    lines = []
    for budget in sorted(by_budget):
        group = by_budget[budget]
        evaluated = _rankable(group, num_samples)
        scored = [c for c in evaluated if _within(c, budget)]
        over = [f"`{c['label']}` ({calls_per_sample(c):.1f} calls)" for c in evaluated if not _within(c, budget)]
        other_n = [f"`{c['label']}` ({c.get('num_samples')} samples)" for c in _rankable(group, None)
                   if c not in evaluated]
        other_text = f" Not ranked, another sample count: {', '.join(other_n)}." if other_n else ""
        if not scored:
            if over:
                lines.append(f"- **Budget {budget}**: every cell used more calls than the budget: {', '.join(over)}."
                             + other_text)
            elif other_n:
                lines.append(f"- **Budget {budget}**: no cell with {num_samples} samples to rank." + other_text)
            continue
        tail = (f" Not ranked, over the budget: {', '.join(over)}." if over else "") + other_text
        best = min(scored, key=lambda c: float(c["fid"]))
        head = (f"- **Budget {budget}**: best by FID is `{best['label']}` ({calls_per_sample(best):.1f} calls, "
                f"FID {_fid_text(best)})")
        uniform = next((c for c in evaluated if _is_uniform_ddim(c)), None)
        if uniform is None:
            lines.append(head + "; no evaluated uniform DDIM cell at this budget to compare with." + tail)
        elif uniform is best:
            lines.append(head + "; uniform DDIM itself has the lowest FID." + tail)
        else:
            a, b = _ci(best), _ci(uniform)
            if a is None or b is None:
                verdict = "no interval to compare"
            else:
                verdict = "within the interval" if a[0] <= b[1] and b[0] <= a[1] else "separated"
            lines.append(head + f"; vs `{uniform['label']}` (FID {_fid_text(uniform)}): {verdict}." + tail)
    return lines


def _target_lines(cells: list[dict[str, Any]], num_samples: Any = None) -> list[str]:
    """The evaluation issue's targets, checked on this report's numbers (met / not met /
    not measured): a policy at 25 calls with FID ≤ uniform DDIM-50; one at 10 calls with
    FID ≤ uniform DDIM-20; one policy better than uniform DDIM at every budget by more than
    the interval (its upper bound below uniform's lower bound). "At 25 calls" means at most
    25 counted calls per sample, pilot calls included — a budget label is not a count. Only
    cells with ``num_samples`` samples take part (:func:`_rankable`)."""
    scored = _rankable(cells, num_samples)
    uniform = {int(c["budget"]): c for c in scored if _is_uniform_ddim(c)}
    lines = []
    for low, high in ((25, 50), (10, 20)):
        rivals = [c for c in scored if _within(c, low) and not _is_uniform_ddim(c)]
        if high not in uniform or not rivals:
            lines.append(f"- A policy at {low} calls with FID ≤ uniform DDIM-{high}: not measured in this report.")
            continue
        best = min(rivals, key=lambda c: float(c["fid"]))
        met = float(best["fid"]) <= float(uniform[high]["fid"])
        lines.append(f"- A policy at {low} calls with FID ≤ uniform DDIM-{high} ({_fid_text(uniform[high])}): "
                     f"{'met' if met else 'not met'} — best within {low} counted calls is `{best['label']}` "
                     f"({calls_per_sample(best):.1f} calls), FID {_fid_text(best)}.")
    budgets = sorted(uniform)
    by_policy: dict[tuple[str, str], dict[int, dict[str, Any]]] = defaultdict(dict)
    for c in scored:
        if not _is_uniform_ddim(c):
            by_policy[(c["policy"], c["solver"])][int(c["budget"])] = c
    winners = []
    for (policy, solver), row in sorted(by_policy.items()):
        if budgets and all(b in row for b in budgets):
            ok = all(_within(row[b], b) and _ci(row[b]) and _ci(uniform[b]) and _ci(row[b])[1] < _ci(uniform[b])[0]
                     for b in budgets)
            if ok:
                winners.append(f"{solver}:{policy}")
    no_intervals = any(_ci(c) is None for c in scored)
    if not budgets or not by_policy or (no_intervals and not winners):
        why = " (no FID intervals)" if budgets and by_policy else ""
        lines.append(f"- A policy better than uniform DDIM at every budget by more than the interval: not measured{why}.")
    else:
        lines.append("- A policy better than uniform DDIM at every budget "
                     f"({', '.join(map(str, budgets))}) by more than the interval: "
                     + (f"met by {', '.join(f'`{w}`' for w in winners)}." if winners else "not met."))
    return lines


def _timestep_text(row: Sequence[int]) -> str:
    """A plan's timesteps as text, runs of four or more consecutive timesteps written a…b:
    [999, 998, …, 0] is "999…0", [20, 11, 8, 7, 6, 5] is "20, 11, 8…5"."""
    parts, i = [], 0
    while i < len(row):
        j = i
        while j + 1 < len(row) and row[j + 1] == row[j] - 1:
            j += 1
        if j - i >= 3:
            parts.append(f"{row[i]}…{row[j]}")
        else:
            parts.extend(str(v) for v in row[i:j + 1])
        i = j + 1
    return ", ".join(parts)


def render_markdown(report: dict[str, Any]) -> str:
    """report.md's text: the run's meta, the metrics table (sorted by policy, then budget), a
    best-by-FID line per budget, the FID bias note, and each deterministic plan's timesteps."""
    meta = report.get("meta", {})
    ref = meta.get("reference") or {}
    cells = _sorted_cells(report.get("cells", []))
    level = _interval_level(meta)
    clip = meta.get("clip")
    lines = [
        f"# stepdrop compare: {meta.get('model', MISSING)}",
        "",
        f"- **Model**: {meta.get('model', MISSING)}",
        f"- **Dataset**: {meta.get('dataset', MISSING)}",
        f"- **Reference set**: {ref.get('split', MISSING)} split, {ref.get('num_images', MISSING)} images",
        f"- **Feature extractor**: {ref.get('extractor', MISSING)}",
        f"- **Samples per cell**: {meta.get('num_samples', MISSING)} (seed {meta.get('seed', MISSING)}, "
        f"the same initial noise in every cell)",
        f"- **Clip x̂0**: {'none' if clip is None else f'[−{clip:g}, {clip:g}]'}",
        f"- **Device**: {meta.get('device', MISSING)} (torch {meta.get('torch', MISSING)})",
        f"- **GFLOPs per model call**: {_fmt(meta.get('gflops_per_call'), '.4g')}",
        f"- **Interval**: {meta.get('interval', MISSING)}",
        f"- **Created**: {meta.get('created', MISSING)}",
        f"- **Command**: `{meta.get('command', MISSING)}`",
        "",
        "## Results",
        "",
    ]
    if not cells:
        lines += ["No cells in this report.", ""]
    else:
        with_is = any(c.get("inception_score") is not None for c in cells)
        lines += [
            f"| label | NFE mean (min–max) | GFLOPs/sample | images/s | FID [{level} CI] | KID×1e3 ± std "
            "| precision | recall |" + (" IS ± std |" if with_is else "") + " classifier score |",
            "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if with_is else "") + "---:|",
            *(_table_row(c, with_is) for c in cells),
            "",
            "NFE: counted model calls of each sample's plan; a policy's pilot evaluations (a gradient-aware "
            "policy's probes) are listed as \"+ x pilot\" per generated sample and included in GFLOPs/sample = "
            "GFLOPs per call × (NFE mean + pilot per sample). \"classifier score\" is the Inception-Score formula "
            "applied to an in-domain classifier; it is comparable only within this report"
            + (", and it is not the IS column (Inception-v3's own head)." if with_is else "."),
            "",
        ]
        budget_lines = _budget_lines(cells, meta.get("num_samples"))
        if budget_lines:
            lines += ["## Best policy per budget", "", *budget_lines, "",
                      f"\"separated\": the two {level} intervals do not overlap; \"within the interval\": they do.", ""]
        lines += ["## Targets", "", *_target_lines(cells, meta.get("num_samples")), ""]
    lines += [
        f"**Note**: FID computed from {meta.get('num_samples', 'N')} samples is biased upward (it falls as the "
        "sample count grows); compare FIDs only between cells with the same number of samples.",
        "",
    ]
    fixed = [c for c in cells if _is_deterministic(c)]
    if fixed:
        lines += ["<details>", "<summary>Timesteps of each deterministic plan (model calls, in order; "
                  "a…b: every timestep from a down to b)</summary>", ""]
        for c in fixed:
            row = [int(t) for t in c["timesteps"][0]]
            lines.append(f"- `{c['label']}` ({len(row)} calls): {_timestep_text(row)}")
        lines += ["", "</details>", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots

def new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=_DPI)


def save_png(fig, path: Path) -> Path:
    """Render ``fig`` as PNG into ``path`` atomically and free its canvas."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI, bbox_inches="tight")
    fig.clear()
    return atomic_write_bytes(path, buffer.getvalue())


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points of ``(throughput, fid)`` pairs, where higher
    throughput and lower FID are better; sorted by increasing throughput (then FID).

    A point is dominated when another has throughput ≥ and FID ≤ with one strictly better;
    of exact duplicates only the first is kept. Non-finite points are ignored.
    """
    finite = [i for i, (x, y) in enumerate(points) if math.isfinite(x) and math.isfinite(y)]
    order = sorted(finite, key=lambda i: (-points[i][0], points[i][1], i))
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front[::-1]


def _plottable(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in report.get("cells", []) if _is_number(c.get("fid"))]


def _yerr(cells: list[dict[str, Any]]):
    """Asymmetric error bars from ``fid_ci`` (0 where a cell has no interval)."""
    low, high = [], []
    for c in cells:
        ci, fid = _ci(c), float(c["fid"])
        low.append(fid - ci[0] if ci else 0.0)
        high.append(ci[1] - fid if ci else 0.0)
    return [low, high]


def _plot_fid_against(cells: list[dict[str, Any]], key: str, xlabel: str, title: str, path: Path, *,
                      log_x: bool = False) -> Path:
    """FID against ``cell[key]``: one line per (policy, solver) with CI error bars; reference
    cells as labelled horizontal dashed lines."""
    fig = new_figure(7.5, 5.0)
    ax = fig.add_subplot()
    lines: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for c in cells:
        if not c.get("reference") and _is_number(c.get(key)):
            lines[(c["policy"], c["solver"])].append(c)
    for (policy, solver), group in sorted(lines.items()):
        group.sort(key=lambda c: float(c[key]))
        ax.errorbar([float(c[key]) for c in group], [float(c["fid"]) for c in group], yerr=_yerr(group),
                    marker="o", markersize=4, capsize=3, linewidth=1.4, label=f"{policy} ({solver})")
    for i, c in enumerate(sorted((c for c in cells if c.get("reference")), key=lambda c: str(c["label"]))):
        ax.axhline(float(c["fid"]), linestyle="--", linewidth=1.0, color=f"C{(len(lines) + i) % 10}",
                   label=f"{c['label']} (reference): FID {float(c['fid']):.2f}")
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("FID (lower is better)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="best")
    return save_png(fig, path)


def _plot_fid_vs_throughput(cells: list[dict[str, Any]], path: Path) -> Path:
    cells = [c for c in cells if _is_number(c.get("images_per_second"))]
    fig = new_figure(7.5, 5.0)
    ax = fig.add_subplot()
    points = [(float(c["images_per_second"]), float(c["fid"])) for c in cells]
    ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=_yerr(cells), fmt="o", markersize=4,
                capsize=3, color="C0", alpha=0.7, label="cells")
    front = pareto_front(points)
    if front:
        xs, ys = [points[i][0] for i in front], [points[i][1] for i in front]
        ax.step(xs, ys, where="pre", color="C3", linewidth=1.6, label="Pareto front")
        ax.plot(xs, ys, "o", color="C3", markersize=6)
        for i in front:
            ax.annotate(str(cells[i]["label"]), points[i], textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("images / s (higher is better)")
    ax.set_ylabel("FID (lower is better)")
    ax.set_title("FID vs throughput (Pareto front: no cell is both faster and better)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return save_png(fig, path)


def plot_cost_curves(report: dict[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """Write ``fid_vs_nfe.png``, ``fid_vs_gflops.png`` (log x) and ``fid_vs_throughput.png`` (with
    the Pareto front) into ``out_dir``. Cells without FID are skipped; returns ``[]`` and writes
    nothing when no cell has one."""
    cells = _plottable(report)
    if not cells:
        return []
    out = Path(out_dir)
    return [
        _plot_fid_against(cells, "nfe_mean", "NFE per sample (mean model calls)", "FID vs NFE",
                          out / "fid_vs_nfe.png"),
        _plot_fid_against(cells, "gflops_per_sample", "GFLOPs per sample (incl. pilot calls)", "FID vs compute",
                          out / "fid_vs_gflops.png", log_x=True),
        _plot_fid_vs_throughput(cells, out / "fid_vs_throughput.png"),
    ]


def plot_timestep_barcode(report: dict[str, Any], out_dir: str | os.PathLike, budget: int = 25) -> Path | None:
    """``timestep_barcode.png``: one row per policy at ``budget`` (reference cells excluded), a
    tick at every model-call timestep on an axis 0..T−1 (T = ``len(timestep_histogram)``).
    A policy whose recorded sample rows differ (per-sample / stochastic) is drawn as an intensity
    strip of its normalised ``timestep_histogram`` instead. Returns None when no cell has that budget."""
    import numpy as np

    cells = sorted((c for c in report.get("cells", []) if int(c["budget"]) == budget and not c.get("reference")),
                   key=lambda c: (str(c["policy"]), str(c["solver"]), str(c["label"])))
    if not cells:
        return None
    steps = [len(c.get("timestep_histogram") or []) for c in cells]
    steps += [max(map(int, row)) + 1 for c in cells for row in c.get("timesteps") or [] if len(row)]
    T = max(steps + [1])
    fig = new_figure(9.0, 1.0 + 0.55 * len(cells))
    ax = fig.add_subplot()
    names = []
    for row, c in enumerate(cells):
        if _is_deterministic(c):
            ax.vlines([int(t) for t in c["timesteps"][0]], row - 0.38, row + 0.38, color="C0", linewidth=1.0)
            names.append(str(c["label"]))
            continue
        hist = np.zeros(T)
        counts = np.asarray(c.get("timestep_histogram") or [], dtype=float)
        hist[: len(counts)] = counts
        if hist.max() > 0:
            hist /= hist.max()
        ax.imshow(hist[None, :], extent=(-0.5, T - 0.5, row - 0.38, row + 0.38), aspect="auto", cmap="Blues",
                  vmin=0.0, vmax=1.0, interpolation="nearest")
        names.append(f"{c['label']} (per-sample)")
    ax.set_xlim(-0.5, T - 0.5)
    ax.set_ylim(len(cells) - 0.5, -0.5)
    ax.set_yticks(range(len(cells)), names, fontsize=8)
    ax.set_xlabel(f"timestep t (0..{T - 1}); ticks: model calls, strips: call frequency over samples")
    ax.set_title(f"Where each policy spends its {budget} model calls")
    return save_png(fig, Path(out_dir) / "timestep_barcode.png")


def _as_images(x: Tensor, name: str):
    """[N, C, H, W] in [−1, 1] (C ∈ {1, 3}) → float numpy [N, H, W(, 3)] in [0, 1]."""
    if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] not in (1, 3):
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a tensor [N, C, H, W] with C = 1 or 3, got {shape}")
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) / 2).numpy()
    return x[:, 0] if x.shape[1] == 1 else x.transpose(0, 2, 3, 1)


def _show(ax, image) -> None:
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_sample_grid(grids: dict[str, Tensor], out_dir: str | os.PathLike, nrow: int = 8) -> Path:
    """``samples_same_seed.png``: one row per label (the label as row title), its first ``nrow``
    images. ``grids`` maps label → images [N, C, H, W] in [−1, 1], drawn from the same seeds."""
    import numpy as np

    if not grids:
        raise ValueError("grids must map at least one label to images, got an empty dict")
    if isinstance(nrow, bool) or not isinstance(nrow, int) or nrow < 1:
        raise ValueError(f"nrow must be an int ≥ 1, got {nrow!r}")
    rows = {label: _as_images(x[:nrow], f"grids[{label!r}]") for label, x in grids.items()}
    strips = {}
    for label, images in rows.items():
        pad_shape = (images.shape[1], 1) + images.shape[3:]
        strips[label] = np.concatenate([part for image in images for part in (image, np.ones(pad_shape))][:-1], axis=1)
    # laid out in inches, so a 26-row grid has the same margins and row gaps as a 3-row one
    width, title, gap = 1.1 * nrow + 0.5, 0.4, 0.3
    strip_w = width - 0.2
    strip_h = max(strip_w * s.shape[0] / s.shape[1] for s in strips.values())
    height = title + len(strips) * (strip_h + gap)
    fig = new_figure(width, height)
    for r, (label, strip) in enumerate(strips.items()):
        bottom = height - title - (r + 1) * (strip_h + gap)
        ax = fig.add_axes((0.1 / width, bottom / height, strip_w / width, strip_h / height))
        _show(ax, strip)
        ax.set_title(label, loc="left", fontsize=9)
    fig.suptitle("Samples from the same initial noise", fontsize=11, y=1 - 0.1 / height, va="top")
    return save_png(fig, Path(out_dir) / "samples_same_seed.png")


def _film_columns(count: int) -> list[int]:
    """At most ten frame indices, evenly spaced, always including the first and the last."""
    if count <= _MAX_FILM_COLUMNS:
        return list(range(count))
    return sorted({round(i * (count - 1) / (_MAX_FILM_COLUMNS - 1)) for i in range(_MAX_FILM_COLUMNS)})


def plot_film_strip(frames: list[tuple[int, Tensor]], out_dir: str | os.PathLike, label: str) -> Path:
    """``film_strip.png``: the state x_t through sampling. ``frames`` = [(t, x_t [n, C, H, W]
    in [−1, 1]), ...] in sampling order, t = −1 for the clean end; one row per sample (the first
    four), one column per frame (at most ten, evenly spaced, the last always included), titled
    "t=…", or "clean" for the sample itself."""
    if not frames:
        raise ValueError("frames must hold at least one (timestep, x_t) pair, got an empty list")
    chosen = [frames[i] for i in _film_columns(len(frames))]
    images = [(int(t), _as_images(x[:_MAX_FILM_ROWS], f"frame at t={int(t)}")) for t, x in chosen]
    n = min(len(x) for _, x in images)
    fig = new_figure(1.2 * len(images) + 0.4, 1.2 * n + 0.6)
    fig.subplots_adjust(wspace=0.06, hspace=0.06)
    for col, (t, x) in enumerate(images):
        for r in range(n):
            ax = fig.add_subplot(n, len(images), r * len(images) + col + 1)
            _show(ax, x[r])
            if r == 0:
                ax.set_title(f"t={t}" if t >= 0 else "clean", fontsize=9)
    fig.suptitle(f"{label}: the state x_t after each step", fontsize=11)
    return save_png(fig, Path(out_dir) / "film_strip.png")
