"""The PNG plots of a ``stepdrop compare`` report: FID against NFE, GFLOPs and images/s (with
the Pareto front), the timestep barcode, the same-seed sample grid and the film strip; and the
figure helpers other commands share (:func:`new_figure`, :func:`save_png`).

The input is the report dict of :mod:`stepdrop.tables`; cells without FID are not plotted.
Plots use matplotlib's object API (``matplotlib.figure.Figure`` rendered by the Agg canvas):
no pyplot state, no display needed, and each figure is freed once it is saved.
"""

from __future__ import annotations

import io
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from torch import Tensor

from stepdrop._io import atomic_write_bytes
from stepdrop.tables import _ci, _is_deterministic, _is_number

__all__ = [
    "new_figure",
    "save_png",
    "pareto_front",
    "plot_cost_curves",
    "plot_timestep_barcode",
    "plot_width_schedules",
    "plot_sample_grid",
    "plot_film_strip",
]

_DPI = 130
_MAX_FILM_COLUMNS = 10
_MAX_FILM_ROWS = 4


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
                      log_x: bool = False, pareto: bool = False) -> Path:
    """FID against ``cell[key]``: one line per (policy, solver, call variants) with CI error
    bars; reference cells as labelled horizontal dashed lines. ``pareto``: also the front of
    all cells, references included, where no other cell has both lower ``key`` and lower FID."""
    fig = new_figure(7.5, 5.0)
    ax = fig.add_subplot()
    lines: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for c in cells:
        if not c.get("reference") and _is_number(c.get(key)):
            lines[(c["policy"], c["solver"], c.get("calls") or "")].append(c)
    for (policy, solver, calls), group in sorted(lines.items()):
        group.sort(key=lambda c: float(c[key]))
        ax.errorbar([float(c[key]) for c in group], [float(c["fid"]) for c in group], yerr=_yerr(group),
                    marker="o", markersize=4, capsize=3, linewidth=1.4, label=f"{policy} ({solver}){calls}")
    costed = [c for c in cells if _is_number(c.get(key))]
    front = pareto_front([(-float(c[key]), float(c["fid"])) for c in costed]) if pareto else []
    if front:
        xs, ys = [float(costed[i][key]) for i in front][::-1], [float(costed[i]["fid"]) for i in front][::-1]
        ax.step(xs, ys, where="post", color="k", linewidth=1.0, alpha=0.6, label="Pareto front (all cells)")
        for i in front:
            ax.annotate(str(costed[i]["label"]), (float(costed[i][key]), float(costed[i]["fid"])),
                        textcoords="offset points", xytext=(4, -10), fontsize=7)
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
    """Write ``fid_vs_nfe.png``, ``fid_vs_gflops.png`` (log x) and ``fid_vs_throughput.png`` (both
    with the Pareto front across all cells) into ``out_dir``. Cells without FID are skipped; returns ``[]`` and writes
    nothing when no cell has one."""
    cells = _plottable(report)
    if not cells:
        return []
    out = Path(out_dir)
    return [
        _plot_fid_against(cells, "nfe_mean", "NFE per sample (mean model calls)", "FID vs NFE",
                          out / "fid_vs_nfe.png"),
        _plot_fid_against(cells, "gflops_per_sample", "GFLOPs per sample (incl. pilot calls)", "FID vs compute",
                          out / "fid_vs_gflops.png", log_x=True, pareto=True),
        _plot_fid_vs_throughput(cells, out / "fid_vs_throughput.png"),
    ]


def plot_width_schedules(report: dict[str, Any], out_dir: str | os.PathLike) -> Path | None:
    """``width_schedules.png``: the width of each model call, against the call's timestep (first
    recorded row), one line per cell that slims its network (DDSM); None when no cell does."""
    cells = [c for c in report.get("cells", []) if c.get("widths")]
    if not cells:
        return None
    fig = new_figure(7.0, 3.8)
    ax = fig.add_subplot()
    for i, c in enumerate(cells):
        ts = (c.get("timesteps") or [[]])[0]
        widths = c["widths"][: len(ts)] if ts else c["widths"]
        xs = ts[: len(widths)] if ts else list(range(len(widths)))
        ax.step(xs, widths, where="mid", lw=1.6, alpha=0.85, color=f"C{i % 10}",
                label=f"{c['label']}: FID {float(c['fid']):.2f}, {float(c['gflops_per_sample']):.2f} GFLOPs"
                if _is_number(c.get("fid")) else c["label"])
    ax.invert_xaxis()  # sampling runs from noise (t = T − 1) to data (t = 0)
    ax.set(xlabel="timestep t of the call (noise → data)", ylabel="network width", ylim=(0, 1.08),
           title="width per call (step-aware widths)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    return save_png(fig, Path(out_dir) / "width_schedules.png")


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
