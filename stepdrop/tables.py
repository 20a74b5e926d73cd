"""The tables of a ``stepdrop compare`` report: report.json, report.csv and report.md.

The input is the report dict built by :mod:`stepdrop.compare` (``{"meta": {...}, "cells":
[...]}``; the schema is in that module). Optional metrics may be ``None`` (a cell not yet
evaluated, KID skipped) and are shown as "–". Every file is written atomically
(:func:`stepdrop._io.atomic_write`), so an interrupted run never leaves a half-written report.
Its PNG plots are drawn by :mod:`stepdrop.plots`.

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

from stepdrop._io import atomic_write_bytes

__all__ = [
    "REPORT_COLUMNS",
    "calls_per_sample",
    "write_report",
    "render_csv",
    "render_markdown",
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

