"""Pictures: the quality-throughput front with baselines, and per-layer architecture maps of children.

Both functions take plain tables (what DIR/front.csv, DIR/baselines/baselines.csv and
DIR/search/*.json hold), draw with matplotlib's Agg backend (no display needed), write a PNG
atomically and return its path. Notebooks call them too; nothing here computes a figure's numbers.
"""

from __future__ import annotations

import functools
import json
import math
import numbers
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from .architecture import BlockConfig
from .errors import PuzzleError, shell_arg

# (method, training) -> legend label; methods as in puzzle.baselines.METHODS
STYLE = {
    "mip": ("tab:blue", "o", "-"),
    "mip-diverse": ("tab:cyan", "D", "none"),
    "mip-refined": ("navy", "P", "none"),
    "greedy": ("tab:orange", "s", "-"),
    "layer_removal": ("tab:red", "v", "-"),
    "attention_removal": ("tab:purple", "^", "-"),
    "uniform_width": ("tab:green", "d", "-"),
    "ffn_fusion": ("tab:olive", "X", "none"),
}
LABELS = {
    "mip": "ours (MIP, BLD library)", "mip-diverse": "ours, best of k diverse", "mip-refined": "ours, refined in context",
    "greedy": "greedy, same library", "layer_removal": "layer removal (ShortGPT)",
    "attention_removal": "attention removal", "uniform_width": "uniform width (Minitron-style)",
    "ffn_fusion": "ours + FFN Fusion",
}


def _save(fig, path: str | Path) -> Path:
    """Write `fig` to `path` atomically, as a PNG.

    Raises:
        ValueError: `path` is a folder, or names another format than PNG (breaker: a folder raised
            IsADirectoryError after leaving the temporary file beside it; x.pdf got PNG bytes).
    """
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        _check_png_path(path)
    except ValueError:
        plt.close(fig)
        raise
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, format="png")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _check_png_path(path: Path) -> None:
    """Raise ValueError where `path` is a folder or names another format than PNG (`_save`'s check)."""
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give the PNG file to write, e.g. {path / 'figure.png'}")
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: the figures are PNGs; give a path ending in .png")


#: axis labels (with units) of the columns a front is drawn against, where the caller gives none (throughput as
#: `front_rows` rescales it: one scale for models timed in other sessions)
_AXIS_LABELS = {"throughput_tok_s": "measured speed-up x the run's parent throughput, generated tokens/s",
                "speedup": "measured speed-up over the parent (x)"}


def front_plot(rows: pd.DataFrame, path: str | Path, *, x: str = "throughput_tok_s", y: str = "kl_nats",
               title: str | None = None, xlabel: str | None = None, log_y: bool = True,
               accuracy: str | None = "downstream_acc") -> Path:
    """Our front and the baselines' on one plot: `y` against measured `x`, one series per method and training.

    Where `rows` also hold a downstream accuracy for some models (column `accuracy`, a fraction, from
    `puzzle front --downstream`), a second panel beside the first draws it against the same `x`, with
    ± one standard error bars when an `<accuracy>_stderr` column exists.

    Args:
        rows: one row per model with name, method ("parent", "mip", "greedy", "layer_removal",
            "attention_removal", "uniform_width", ...), training ("bld", "init", "none"), `x`, `y`.
            Series are drawn in order of `x`; init-only series dashed with hollow markers.
        path: the PNG to write.
        log_y: a log scale for KL (rows with y <= 0 other than the parent are left out, with a warning; a linear
            scale when no row has y > 0).
        accuracy: the downstream-accuracy column of the second panel (None: never draw it).

    Returns:
        The PNG's path.

    Raises:
        KeyError: rows lack name, method, training, `x` or `y`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    body = pd.to_numeric(rows.loc[rows["method"] != "parent", y], errors="coerce")
    if log_y and (body <= 0).any():  # a log scale cannot draw them (reviewer: all at 0 crashed the plot)
        left = sorted(rows.loc[body.index[body <= 0], "name"])
        if (body > 0).any():
            warnings.warn(f"front plot: {', '.join(map(str, left))} with {y} <= 0 left out of the log scale")
        else:
            log_y = False  # nothing positive to draw on a log scale: a linear one
    panels = [(y, log_y, "evaluation KL(parent || child), nats/token" if y == "kl_nats" else y)]
    if accuracy and accuracy in rows.columns and rows[accuracy].notna().any():
        tasks = rows["downstream_tasks"].dropna().iloc[0] if "downstream_tasks" in rows.columns else ""
        panels.append((accuracy, False, f"downstream accuracy, mean over {tasks.replace(',', ', ')}" if tasks
                       else "downstream accuracy"))
    fig, axes = plt.subplots(1, len(panels), figsize=(7.2 * len(panels), 4.8), dpi=120, squeeze=False)
    for ax, (col, log, ylabel) in zip(axes[0], panels):
        err = f"{col}_stderr" if col != y and f"{col}_stderr" in rows.columns else None
        _draw_series(ax, rows, x, col, log, err, lower_is_better=col == y)  # accuracy: higher is better
        ax.set_xlabel(xlabel or _AXIS_LABELS.get(x, x))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="best")
    if title and len(panels) > 1:
        fig.suptitle(title, fontsize=9)
    elif title:
        axes[0][0].set_title(title, fontsize=9)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def target_in_name(name) -> str | None:
    """The speed-up target a model's name carries, as written: 'child-1.5x' -> '1.5', 'greedy-1.25x-init' -> '1.25',
    'uniform-1.5x-kv2' -> '1.5', 'layers-1e+09x' -> '1e+09'; None for a name without one ('parent')."""
    found = re.search(r"-([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)x(?:-[A-Za-z][A-Za-z0-9]*)*$", str(name))
    return found.group(1) if found else None


def _draw_series(ax, rows: pd.DataFrame, x: str, y: str, log_y: bool, err: str | None,
                 lower_is_better: bool = True) -> None:
    """One line per (method, training) of `y` against `x` on `ax` through the models on its front (`on_front`), the
    others as faded, unjoined markers; the parent as a dotted vertical line."""
    rows = rows[["name", "method", "training", x, y] + ([err] if err else [])].dropna(subset=[x, y])
    parent = rows[rows["method"] == "parent"]
    px = float(parent[x].iloc[0]) if len(parent) else -math.inf
    beaten_drawn = labelled = False
    for (method, training), part in rows[rows["method"] != "parent"].groupby(["method", "training"], sort=False):
        color, marker, line = STYLE.get(method, ("tab:gray", "o", "-"))
        init = training == "init"
        if log_y:
            part = part[part[y] > 0]
        part = part.sort_values(x)
        label = LABELS.get(method, method) + (", init only" if init else ", after BLD" if training == "bld" and method
                                               not in ("mip", "mip-diverse", "mip-refined", "ffn_fusion") else "")
        keep = pd.Series(on_front(part[x], part[y], lower_is_better, above=px), index=part.index)
        front, beaten = part[keep], part[~keep]
        # a hollow, larger diamond: the refined pick's plus stays visible inside it where both are one model (reviewer)
        face = "none" if init or method == "mip-diverse" else color
        size = 9 if method == "mip-diverse" else 6
        ax.plot(front[x], front[y], marker=marker, linestyle="--" if init and line != "none" else line, color=color,
                markerfacecolor=face, markersize=size, label=label, alpha=0.9)
        if len(beaten):
            ax.plot(beaten[x], beaten[y], marker=marker, linestyle="none", color=color, markerfacecolor=face,
                    markersize=size, alpha=0.3)
            beaten_drawn = True
        targets: dict[tuple, list[str]] = {}  # a point's targets: one child of several targets is one label
        for r in part.itertuples():  # each point's target (reviewer: which baseline point is which took the CSV)
            # "child-1.5x", "greedy-1.25x-init", "child-1.5x-refined", "uniform-1.5x-kv2" (reviewer: some unlabelled)
            if (target := target_in_name(r.name)) is not None and lower_is_better:
                targets.setdefault((getattr(r, x), getattr(r, y)), []).append(f"{target}x")
        labelled = labelled or bool(targets)
        for point, names in targets.items():
            ax.annotate("/".join(dict.fromkeys(names)), point, textcoords="offset points", xytext=(3, 3), fontsize=6,
                        color=color, alpha=0.8)
        if err:
            ax.errorbar(part[x], part[y], yerr=part[err], fmt="none", ecolor=color, alpha=0.5, capsize=2)
    if labelled:  # an auditor read a greedy point's "2x" as its measured speed-up
        ax.plot([], [], linestyle="none", label="labels: the model's speed-up target (x axis: as measured)")
    if beaten_drawn:  # a legend entry says what the faded markers are
        ax.plot([], [], marker="o", linestyle="none", color="gray", alpha=0.3,
                label="faded: beaten by a faster model of its series (or slower than the parent)")
    if len(parent):
        ax.axvline(px, color="black", linewidth=0.8, linestyle=":")
        ax.annotate("parent", (px, 0.98), xycoords=("data", "axes fraction"), fontsize=8, ha="right", va="top",
                    rotation=90)
        if not log_y:  # accuracy: the parent's value is a point, not 0
            ax.plot([px], [float(parent[y].iloc[0])], marker="*", color="black", markersize=10, linestyle="none",
                    label="parent")
    if log_y:
        ax.set_yscale("log")
        _plain_log_ticks(ax, rows.loc[(rows["method"] != "parent") & (rows[y] > 0), y])


def _plain_log_ticks(ax, values: pd.Series) -> None:
    """Tick labels of a log KL axis as plain numbers (fresh user, stop 69: a demo front of KLs 1.2 to 4.3 read
    "2x10^0, 3x10^0, 4x10^0", with no tick near its lowest point): within a decade, log-spaced ticks at 1, 1.5, 2,
    3, 4, 5 and 7 of each decade (reviewer: linear ones left the axis' bottom unlabelled); over more, matplotlib's
    log ticks, labelled plainly."""
    from matplotlib.ticker import FuncFormatter, LogFormatter, LogLocator, NullFormatter

    if len(values) and float(values.max()) < 10 * float(values.min()):
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    else:
        ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def kind_is_attention(variant) -> bool:
    from .architecture import AttentionConfig

    return isinstance(variant, AttentionConfig)


def _cell_color(variant, parent_size: int | None):
    """Color of one subblock: darker = closer to the parent's size; linear orange; no_op light grey."""
    from matplotlib import colormaps

    kind = variant.kind
    if kind == "no_op":
        return (0.93, 0.93, 0.93, 1.0)
    if kind == "linear":
        return (0.93, 0.5, 0.1, 1.0) if kind_is_attention(variant) else (1.0, 0.72, 0.35, 1.0)
    size = variant.num_kv_heads if kind == "gqa" else variant.intermediate_size
    share = size / parent_size if parent_size else 1.0
    cmap = colormaps["Blues" if kind == "gqa" else "Greens"]
    return cmap(0.3 + 0.65 * min(1.0, share))


def architecture_map(choices: Mapping[str, Sequence], path: str | Path, *, parent_block: BlockConfig | None = None,
                     title: str | None = None) -> Path:
    """A per-layer map of children: one row per child, one column per layer, attention above FFN.

    Args:
        choices: child name -> its blocks (BlockConfig or block ids), all of the same depth.
        parent_block: the parent's block (sets the darkest shade); default the largest sizes seen.
        path: the PNG to write.

    Returns:
        The PNG's path.

    Raises:
        ValueError: no children, or children of different depths.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    blocks = {n: [b if isinstance(b, BlockConfig) else BlockConfig.from_id(b) for b in bs] for n, bs in choices.items()}
    if not blocks or len({len(bs) for bs in blocks.values()}) != 1 or not next(iter(blocks.values())):
        raise ValueError("architecture_map needs at least one child, all of the same depth (at least one layer)")
    all_blocks = [b for bs in blocks.values() for b in bs]
    if parent_block is not None:
        kv, width = parent_block.attention.num_kv_heads, parent_block.ffn.intermediate_size
    else:
        kv = max((b.attention.num_kv_heads or 0 for b in all_blocks), default=0) or None
        width = max((b.ffn.intermediate_size or 0 for b in all_blocks), default=0) or None
    depth, names = len(next(iter(blocks.values()))), list(blocks)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.24 * depth + 2.5), 0.55 * len(names) + 1.6), dpi=120)
    for r, name in enumerate(names):
        y0 = len(names) - 1 - r
        for i, b in enumerate(blocks[name]):
            ax.add_patch(Rectangle((i, y0 + 0.5), 0.95, 0.42, color=_cell_color(b.attention, kv)))
            ax.add_patch(Rectangle((i, y0 + 0.05), 0.95, 0.42, color=_cell_color(b.ffn, width)))
    ax.set_xlim(0, depth)
    ax.set_ylim(0, len(names))
    ax.set_yticks([len(names) - 1 - r + 0.5 for r in range(len(names))], names, fontsize=8)
    step = 1 if depth <= 32 else 5
    ax.set_xticks([i + 0.47 for i in range(0, depth, step)], [str(i) for i in range(0, depth, step)], fontsize=7)
    ax.set_xlabel("layer (each cell: attention above, FFN below)", fontsize=8)
    for side in ("top", "right", "left", "bottom"):
        ax.spines[side].set_visible(False)
    kinds = sorted({b.attention.id for b in all_blocks} | {b.ffn.id for b in all_blocks}, key=_legend_order)
    handles = []
    for vid in kinds:
        from .architecture import AttentionConfig, FFNConfig

        v = AttentionConfig.from_id(vid) if vid.startswith("attn-") else FFNConfig.from_id(vid)
        handles.append(Patch(color=_cell_color(v, kv if vid.startswith("attn-") else width), label=vid))
    ax.legend(handles=handles, fontsize=7, ncol=min(len(handles), 5), loc="upper center",
              bbox_to_anchor=(0.5, -0.18 if len(names) > 2 else -0.35), frameon=False)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def _legend_order(vid: str):
    kind = 0 if vid.startswith("attn-") else 1
    tail = vid.split("-", 1)[1]
    size = int("".join(ch for ch in tail if ch.isdigit()) or 0)
    return (kind, -size if size else (1 if "linear" in tail else 2) * 10**9)


FAR_FROM_TARGET = 1.2  # a front's nearest measured model this many times faster or slower than the target: flagged


def on_front(xs, ys, lower_is_better: bool = True, above: float = -math.inf) -> list[bool]:
    """For each point (x: speed or throughput, higher is faster), whether it is on its front: finite, x above
    `above` (the parent's, where a slower model is beaten by the parent itself), and no faster point has as good a y
    (lower KL; higher accuracy with `lower_is_better` False). Of points alike in x and y the first one given is kept.
    `matched_ratios` reads its fronts so, and the plots draw the line through these points alone (reviewer: the
    line zigzagged through slower, worse models the ratios leave out)."""
    xs, ys = [float(v) for v in xs], [float(v) for v in ys]
    sign = 1.0 if lower_is_better else -1.0
    usable = [i for i in range(len(xs)) if math.isfinite(xs[i]) and math.isfinite(ys[i]) and xs[i] > above]
    keep, best = [False] * len(xs), math.inf
    for i in sorted(usable, key=lambda i: (-xs[i], sign * ys[i])):  # from the fastest; of one x, the best first
        if sign * ys[i] < best:
            best = sign * ys[i]
            keep[i] = True
    return keep


def matched_ratios(rows: pd.DataFrame, speedups=(1.25, 1.5, 2.0), ours: str = "mip", y: str = "kl_nats") -> pd.DataFrame:
    """Our `y` divided by each baseline's at matched measured speed-up (linear interpolation).

    Each (method, training) front is the parent (speed-up 1, y 0) plus its measured models that no
    faster one beats (a model with a y as low at a higher speed-up leaves it out), sorted by speed-up,
    so y rises with speed-up; its y at speed-up s is interpolated linearly between neighbours. A method
    is compared at s only where its points reach s (no extrapolation). Where a front's slowest model
    is far above s, its y at s comes from the line between the parent and that model, a figure no
    measured model has: `ours_from` / `baseline_from` name the models each value lies between, at
    their own measured speed-ups ("parent@1x..child-2x@2.02x"; one name where a model sits at s),
    and `ours_gap` / `baseline_gap` how far the nearer
    of them is from s (max(s_model / s, s / s_model); 1 when one sits at s; inf when only the parent
    brackets s), which `ratio_table` flags above FAR_FROM_TARGET.

    Returns:
        One row per (speedup, method, training) with ours_<y>, baseline_<y>, ratio, ours_from,
        baseline_from, ours_gap and baseline_gap (NaN / "" where a front does not reach s).
    """
    def curve(part):  # a model without a finite speed-up or y (not measured) is no point of its front
        names = part["name"] if "name" in part else [""] * len(part)
        # breaker: a beaten model once stayed as a point at its own speed-up with the faster one's y, which bent the
        # line from the parent (a slower, worse model made the front worse) and disagreed with the names it gave
        keep = on_front(part["speedup"], part[y], above=1.0)
        out = sorted((float(s), float(v), str(n), float(s))
                     for s, v, n, k in zip(part["speedup"], part[y], names, keep) if k)
        return [(1.0, 0.0, "parent", 1.0)] + out  # (speed-up, y, model, its speed-up), y rising with speed-up

    def label(point):
        return f"{point[2]}@{point[3]:.3g}x"

    def gap(points, s):  # from the models' own speed-ups (reviewer: a faster model's KL was said to sit at s)
        return min((max(p[3] / s, s / p[3]) for p in points if p[2] != "parent"), default=math.inf)

    def at(points, s):
        """(y at s, where it comes from, the gap) or (nan, "", nan) where the front does not reach s."""
        if not points or points[-1][0] < s or s < points[0][0]:  # below 1x: no model of the front is that slow
            return math.nan, "", math.nan
        for lo, hi in zip(points, points[1:]):
            if lo[0] <= s <= hi[0]:
                if s in (lo[0], hi[0]) or hi[0] == lo[0]:
                    pick = min((p for p in (lo, hi) if p[0] == s), key=lambda p: p[1])
                    return pick[1], label(pick), gap([pick], s)
                v = lo[1] + (hi[1] - lo[1]) * (s - lo[0]) / (hi[0] - lo[0])
                where = label(lo) if label(lo) == label(hi) else f"{label(lo)}..{label(hi)}"  # one model: its KL
                return v, where, gap([lo, hi], s)
        return points[-1][1], label(points[-1]), gap(points[-1:], s)

    body = rows[rows["method"] != "parent"]
    mine = curve(body[body["method"] == ours])
    out = []
    for (method, training), part in body[body["method"] != ours].groupby(["method", "training"], sort=False):
        theirs = curve(part)
        for s in speedups:
            (a, a_from, a_gap), (b, b_from, b_gap) = at(mine, s), at(theirs, s)
            out.append({"speedup": s, "method": method, "training": training, f"ours_{y}": a, f"baseline_{y}": b,
                        "ratio": a / b if b and math.isfinite(a) and math.isfinite(b) else math.nan,
                        "ours_from": a_from, "baseline_from": b_from, "ours_gap": a_gap, "baseline_gap": b_gap})
    return pd.DataFrame(out)


@functools.lru_cache(maxsize=None)
def _median_se_per_iqr(rounds: int) -> float:
    """Standard error of the median of `rounds` normal samples per unit of their expected sample IQR.

    By simulation (2,000,000 / rounds draws, fixed seed; numpy's default, linearly interpolated quantiles, as
    the timings use): for 7 rounds 0.41, where the large-sample formula sqrt(pi/2) / 1.349 / sqrt(7)
    = 0.35 would understate it (a sample IQR of 7 values averages 0.82 of 1.349 sigma).
    """
    import numpy as np

    x = np.random.default_rng(0).standard_normal((max(2_000, 2_000_000 // rounds), rounds))  # <= 16 MB
    q1, q3 = np.quantile(x, [0.25, 0.75], axis=1)
    return float(np.median(x, axis=1).std() / (q3 - q1).mean())


def median_rel_se(runtime_ms, iqr_ms, rounds: int):
    """Relative standard error of a median runtime, from the IQR of the `rounds` samples behind it.

        se / median = k(rounds) * IQR / median,   k from `_median_se_per_iqr` (normal noise)

    Works on floats, numpy arrays and pandas Series. Raises ValueError for rounds < 2.
    """
    if isinstance(rounds, bool) or not isinstance(rounds, numbers.Integral) or not 2 <= rounds <= 1000:
        raise ValueError(f"rounds must be a whole number of timing rounds from 2 (an IQR needs two samples) to 1000, "
                         f"got {rounds!r}")
    return _median_se_per_iqr(int(rounds)) * iqr_ms / runtime_ms


def matched_ratio_intervals(rows: pd.DataFrame, speedups=(1.25, 1.5, 2.0), *, rounds: int, ours: str = "mip",
                            y: str = "kl_nats", draws: int = 1000, seed: int = 0,
                            levels: tuple[float, float] = (0.05, 0.95), min_reached: float = 0.5) -> pd.DataFrame:
    """`matched_ratios` with the timing noise of the measured speed-ups carried through.

    A parametric bootstrap: each draw multiplies every model's runtime by exp(N(0, se)), se its
    `median_rel_se` (runtime_ms, runtime_iqr_ms, `rounds`), the parent's runtime by its own draw
    (shared by all models of the draw), recomputes speed-up = parent / model, and the matched
    ratios. Models with the same `architecture` (when the column exists) share a draw. `y` (the
    evaluation figure) is held fixed: every model is evaluated on the same tokens.

    Args:
        rows: as for `matched_ratios`, plus runtime_ms and runtime_iqr_ms for every model and the
            parent (row with method "parent"); speed-ups are taken as parent runtime / runtime_ms
            (a `speedup` column is ignored).
        rounds: timing rounds behind each median (benchmarks/front.py --phase remeasure: --repeats).

    Returns:
        `matched_ratios(rows)` plus ratio_lo / ratio_median / ratio_hi (the `levels` quantiles and
        the median over the draws where both fronts reach the speed-up; NaN where fewer than
        `min_reached` of the draws do) and reached (the share of draws where they do).

    Raises:
        ValueError: no parent row, a runtime or IQR missing, not finite, <= 0 (runtime) or < 0
            (IQR), nothing to compare, draws < 1, levels out of order, or rounds outside 2-1000.
    """
    import numpy as np

    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    if not 0 < levels[0] < levels[1] < 1:
        raise ValueError(f"levels must be two quantiles 0 < lo < hi < 1, got {levels}")

    parent = rows[rows["method"] == "parent"]
    if len(parent) != 1:
        raise ValueError(f"rows need exactly one parent row (method 'parent'), got {len(parent)}")
    missing = rows[["runtime_ms", "runtime_iqr_ms"]].isna().any(axis=1)
    if missing.any():
        raise ValueError(f"runtime_ms / runtime_iqr_ms missing for {list(rows.loc[missing, 'name'])}: time the models "
                         "in one session (`puzzle front --out DIR --one-session`, or in a checkout "
                         "benchmarks/front.py --phase remeasure)")
    runtime, iqr = rows["runtime_ms"].to_numpy(float), rows["runtime_iqr_ms"].to_numpy(float)
    bad = ~(np.isfinite(runtime) & (runtime > 0) & np.isfinite(iqr) & (iqr >= 0))
    if bad.any():
        raise ValueError(f"runtime_ms must be finite and > 0, runtime_iqr_ms finite and >= 0; not so for "
                         f"{list(rows.loc[bad, 'name'])}")
    se = np.asarray(median_rel_se(runtime, iqr, rounds))
    key = rows["architecture"].fillna(rows["name"]) if "architecture" in rows else rows["name"]
    groups = pd.factorize(key)[0]  # models of one architecture share their draw
    is_parent = (rows["method"] == "parent").to_numpy()
    rng = np.random.default_rng(seed)
    # the point ratio from the same runtimes as the draws (a `speedup` column is replaced)
    base = matched_ratios(rows.assign(speedup=float(runtime[is_parent][0]) / runtime), speedups, ours, y)
    if base.empty:
        raise ValueError(f"nothing to compare: rows need models of method {ours!r}, at least one baseline, and "
                         "speed-up targets")
    samples = []
    for _ in range(draws):
        z = rng.standard_normal(groups.max() + 1)[groups]
        drawn = runtime * np.exp(z * se)  # (models,)
        parent_ms = float(drawn[is_parent][0])
        r = matched_ratios(rows.assign(speedup=np.where(is_parent, 1.0, parent_ms / drawn)), speedups, ours, y)
        samples.append(r["ratio"].to_numpy())
    ratios = np.vstack(samples)  # (draws, rows of base)
    ok = np.isfinite(ratios)
    q = np.full((3, len(base)), np.nan)
    for j in np.flatnonzero(ok.any(axis=0) & (ok.mean(axis=0) >= min_reached)):
        q[:, j] = np.quantile(ratios[ok[:, j], j], (levels[0], 0.5, levels[1]))
    return base.assign(ratio_lo=q[0], ratio_median=q[1], ratio_hi=q[2], reached=ok.mean(axis=0))


def _warn_missing_baseline_rows(run_dir: Path, have: set[str]) -> None:
    """Warn of the models DIR/baselines/baselines.csv lists whose row file (DIR/baselines/rows/<name>.json) is gone:
    the front and its ratios are drawn without them (breaker: a deleted row moved a ratio from 1.00 to 0.49 without a
    word). Nothing when there is no readable baselines.csv."""
    try:
        listed = pd.read_csv(run_dir / "baselines" / "baselines.csv")
        names = listed["name"].astype(str)
    except (OSError, ValueError, KeyError, pd.errors.ParserError):
        return
    gone = [n for n in dict.fromkeys(names) if n != "parent" and n not in have]
    if gone:
        # their targets, which the front's may no longer hold (breaker: the command named built the front's targets
        # only, and the row then left baselines.csv without a word)
        targets = pd.to_numeric(listed.loc[names.isin(gone), "target_speedup"], errors="coerce") \
            if "target_speedup" in listed.columns else pd.Series(dtype=float)
        targets = sorted({float(t) for t in targets if 1 < t < math.inf})
        flag = f" --speedups {','.join(f'{t:g}' for t in targets)}" if targets else ""
        warnings.warn(f"{run_dir / 'baselines' / 'baselines.csv'} lists {', '.join(gone)}, whose row file"
                      f"{'s are' if len(gone) > 1 else ' is'} missing from {run_dir / 'baselines' / 'rows'}: the front "
                      f"and its ratios are drawn without {'them' if len(gone) > 1 else 'it'} (`puzzle baselines --out "
                      f"{shell_arg(run_dir)}{flag}` builds {'them' if len(gone) > 1 else 'it'} again)")


def _model_row(path: Path) -> dict | None:
    """One model's row file (DIR/front_rows/, DIR/baselines/rows/), or None with a warning when it is damaged: not
    a JSON object, without a name or a method (the name "parent" for the parent alone), or without a speed-up in
    (0, PLAUSIBLE_SPEEDUP] and an evaluation KL in [0, PLAUSIBLE_KL] (the command that wrote it, `puzzle refine`,
    `puzzle fuse` or `puzzle baselines`, writes it again), or edited since it was written (`baselines.row_edited`)."""
    from .baselines import row_edited
    from .io import read_json

    try:
        row = read_json(path)
    except PuzzleError as e:
        row, why = None, str(e)
    else:
        speedup = row.get("speedup") if isinstance(row, dict) else None
        kl = row.get("kl_nats") if isinstance(row, dict) else None
        fine = (isinstance(row, dict) and isinstance(row.get("name"), str) and isinstance(row.get("method"), str)
                and (row["name"] == "parent") == (row["method"] == "parent")
                and isinstance(row.get("architecture", ""), str)  # breaker: a number gave a pyarrow traceback
                and (row["method"] != "ffn_fusion" or row["name"] == path.stem and all(
                    isinstance(row.get(k), str) and row[k] for k in ("fused_from", "child_architecture")))
                and _finite(speedup) and 0 < speedup <= PLAUSIBLE_SPEEDUP and _finite(kl) and 0 <= kl <= PLAUSIBLE_KL)
        why = (f"{path} is not a model's row (a name, a method, a measured speed-up up to {PLAUSIBLE_SPEEDUP:g} and "
               f"an evaluation KL from 0 to {PLAUSIBLE_KL:g} nats; the architecture as text, and for a fused child "
               f"the child it was fused from)")
        row = row if fine else None
        if row is not None and row_edited(row):  # breaker: a kl_nats set by hand was drawn, and its ratio printed
            row, why = None, (f"{path} was edited since it was written (its figures no longer match its checksum)")
    if row is None:
        where = "puzzle baselines" if path.parent.name == "rows" else \
            "puzzle fuse" if path.stem.endswith("-fused") else \
            "puzzle refine` or `puzzle fuse" if path.stem == "parent" else "puzzle refine"
        warnings.warn(f"{why}; left out of the front (`{where}` writes it again)")
    return row


def _current_row_inputs(run_dir: Path) -> dict:
    """What a model row's figures (DIR/front_rows/, DIR/baselines/rows/: `baselines.realize_all`'s `inputs`) must
    have been measured on to be drawn with the run's front now: the evaluation split (its sha256 prefix, as
    DIR/data/manifest.json records it) and the score table (DIR/score/score_table.csv by sha256). A part that
    cannot be read is left out (not checked)."""
    from .io import read_json, sha256_file

    current = {}
    try:
        current["eval_sha"] = str(read_json(run_dir / "data" / "manifest.json")["splits"]["eval"]["sha256"])[:16]
    except (PuzzleError, OSError, KeyError, TypeError):
        pass
    table = run_dir / "score" / "score_table.csv"
    if table.is_file():
        current["score_table_sha256"] = sha256_file(table)
    return current


def _searched_architecture(run_dir: Path, name) -> str | None:
    """The compact architecture DIR/search/<name>.json holds, or None when there is no readable record."""
    return _searched_child(run_dir, name)[0]


def _searched_child(run_dir: Path, name) -> tuple[str | None, str | None]:
    """The compact architecture and library stage ("bld" where it names none) DIR/search/<name>.json holds, or
    (None, None) when there is no readable record."""
    from .io import read_json
    from .pipeline import compact_architecture

    if not isinstance(name, str) or Path(name).name != name or not name:
        return None, None
    try:
        record = read_json(run_dir / "search" / f"{name}.json")
        return compact_architecture(record["choice"]), str(record.get("library_stage", "bld"))
    except (PuzzleError, OSError, KeyError, TypeError, ValueError, AttributeError):
        return None, None


def stale_inputs(inputs: dict, current: dict, missing_is_stale: bool = False) -> list[str]:
    """What a measurement recorded in `inputs` (`baselines.row_inputs`) was taken on that differs from `current`
    (the parts it holds): "evaluation text", "score table", "workload". A part `inputs` lacks is not compared, or
    with `missing_is_stale` counts as another."""
    parts = (("eval_sha", "evaluation text"), ("score_table_sha256", "score table"), ("workload", "workload"))
    return [what for key, what in parts
            if key in current and (key in inputs or missing_is_stale) and inputs.get(key) != current[key]]


def _row_is_current(row: dict, current: dict, sub: str, run_dir: Path) -> bool:
    """Whether `row` was measured on the run's evaluation split, score table and workload as they are now
    (`current`, the parts it holds), and a front_rows/ row on the child DIR/search/<name>.json holds now (for a
    fused child of `puzzle fuse`, on the child it was fused from); a row that was not is left out of the front
    with a warning naming the command that measures it again (its KL is on another text, its child comes from
    another library or another refinement, or its speed-up is of another workload)."""
    if row.get("name") == "parent":  # its timing scales its source's throughput; its KL is 0 on any text
        return True
    inputs = row.get("inputs") if isinstance(row.get("inputs"), dict) else {}
    stale = stale_inputs(inputs, current)
    if sub == "front_rows" and (searched := _searched_architecture(run_dir, row.get("name"))) is not None \
            and searched != row.get("architecture"):  # e.g. `refine --no-measure` chose another child since
        stale.append("architecture (search/ holds another child of this name now)")
    fused_from = row.get("fused_from") if row.get("method") == "ffn_fusion" else None  # `puzzle fuse`'s row
    if sub == "front_rows" and fused_from is not None \
            and _searched_child(run_dir, fused_from) != (row.get("child_architecture"), row.get("training")):
        # breaker: a stage change kept it
        stale.append(f"child (search/{fused_from}.json holds another child now, or none)")
    # the searched child a refinement or fusion comes from (a fused refined child: the refined one's)
    plain = str(fused_from or row.get("name")).removesuffix("-diverse").removesuffix("-refined")
    if sub == "front_rows" and not stale and (children := _searched_names(run_dir)) is not None \
            and plain not in children:  # breaker: a child a later search left out kept its fused and refined rows,
        # drawn beside a front whose exclusions or vLLM setting rule them out
        warnings.warn(f"{row.get('name')} ({sub}) is of {plain}, which is not among the run's children now "
                      f"(search/chosen.json): left out of the front (a search or front with that target brings it "
                      f"back; delete {run_dir / sub / (str(row.get('name')) + '.json')} to stop this warning)")
        return False
    if stale:
        where = "puzzle baselines" if sub.startswith("baselines") else f"puzzle refine --name {plain}"
        does = "measures it again"
        if fused_from is not None:
            where, does = _fuse_again(run_dir, fused_from, run_dir / sub / f"{row.get('name')}.json")
        warnings.warn(f"{row.get('name')} ({sub}) was measured on another {' and '.join(stale)} than the run's now: "
                      f"left out of the front (`{where} --out {shell_arg(run_dir)}` {does})")
    return not stale


def _fuse_again(run_dir: Path, name: str, row_path: Path) -> tuple[str, str]:
    """The `puzzle fuse` command (without --out) for the fused child of the searched child `name`, with the
    --include-leading its fusion record (DIR/fusion/<name>.json) was made with, and what it does now: "measures it
    again", or, where DIR/search/<name>.json holds a child with no run to fuse (`fusion.has_run_to_fuse`; breaker: the
    command only removed the row) or one of the init-only library (which fuse refuses), what happens instead."""
    from .fusion import _comparison_child, has_run_to_fuse
    from .io import read_json

    try:
        leading = read_json(run_dir / "fusion" / f"{name}.json")["settings"]["include_leading"] is True
    except (PuzzleError, OSError, KeyError, TypeError):
        leading = False
    command = f"puzzle fuse --name {name}" + (" --include-leading" if leading else "")
    try:
        record = read_json(run_dir / "search" / f"{name}.json")
        if _comparison_child(record):  # as fuse refuses it
            return command, (f"refuses it: {name} is a child of the init-only library now; delete {row_path} to stop "
                             f"this warning")
        if not has_run_to_fuse(record["choice"], leading):
            return command, "removes its row: the child there now has no run to fuse"
    except (PuzzleError, OSError, KeyError, TypeError, ValueError, AttributeError):  # ValueError: ArchitectureError
        pass  # unreadable: `puzzle fuse` says why
    return command, "measures it again"


def _searched_names(run_dir: Path) -> set[str] | None:
    """The run's searched children now (`pipeline.searched_names`), or None where they cannot be read."""
    from .pipeline import searched_names

    names = searched_names(run_dir)
    return None if names is None else set(names)


def _front_architectures(run_dir: Path, front: pd.DataFrame) -> list:
    """Each front.csv row's architecture (compact form) from DIR/summary.csv, the measurement the front was drawn
    from: a row whose name and evaluation KL it holds alike; None where it does not (a breaker: front_all.csv gave
    the baselines' architectures and none of our children's)."""
    try:
        summary = pd.read_csv(run_dir / "summary.csv", usecols=["name", "kl_nats", "architecture"])
    except (OSError, ValueError, pd.errors.ParserError):
        return [None] * len(front)
    kls = pd.to_numeric(summary["kl_nats"], errors="coerce")  # a hand-edited cell: no match, not a traceback
    known = {n: (kl, a) for n, kl, a in zip(summary["name"], kls, summary["architecture"]) if isinstance(a, str)}
    out = []
    for name, kl in zip(front["name"], pd.to_numeric(front["kl_nats"], errors="coerce")):
        hit = known.get(name)
        same = hit is not None and math.isclose(hit[0], kl, rel_tol=1e-9, abs_tol=1e-12)  # NaN matches nothing
        out.append(hit[1] if same else None)
    return out


def front_rows(run_dir: str | Path, with_downstream: bool = True, inputs: dict | None = None,
               exclude: dict[str, str] | None = None, with_one_session: bool = True) -> pd.DataFrame:
    """Every realized model of a run directory as tidy front rows (what `front_plot` draws).

    Reads DIR/front.csv (the pipeline's children: method "mip", training "bld"), DIR/front_rows/*.json
    and DIR/baselines/rows/*.json (written by `baselines.realize_all`: our diverse and refined
    children, the baselines), whichever exist; a row measured on another evaluation split or score table
    than the run's now (or, given `inputs`, `baselines.row_inputs(run)`, on another workload too) is left out
    with a warning (`_row_is_current`), and so is a baselines/rows/ row named in `exclude` (name -> why:
    `baselines.stale_greedy_rows`). A model listed twice keeps its first row. Speed-ups
    are measured against the parent in the same session; where DIR/one_session.json (`puzzle front
    --one-session`) timed a model as drawn, its speed-up from that one session replaces the row's
    (`one_session.apply_one_session`; not with `with_one_session=False`); throughput_tok_s is
    rescaled to the parent's throughput of the first source (of the one session, where it gave the speed-ups), so
    all rows share one axis.

    Returns:
        DataFrame with name, method, training, speedup, throughput_tok_s, kl_nats, predicted_kl_nats,
        lm_loss, params, architecture (compact form; a front.csv row's from DIR/summary.csv), source (the file it came
        from); parent first. With a current DIR/one_session.json also timing ("one session" or "own
        session"), speedup_own_session, runtime_ms and runtime_iqr_ms (ms per request), and
        attrs["session_rounds"] its rounds (else None). With
        `with_downstream` and DIR/downstream/ results (`puzzle front --downstream`), also downstream_acc,
        downstream_acc_stderr, downstream_tasks and acc_<task>.

    Raises:
        FileNotFoundError: the directory holds none of these files.
    """
    run_dir = Path(run_dir)
    parts = []
    if (run_dir / "front.csv").is_file():
        df = pd.read_csv(run_dir / "front.csv")
        df["method"] = ["parent" if n == "parent" else "mip" for n in df["name"]]
        df["training"] = ["none" if n == "parent" else "bld" for n in df["name"]]
        df["architecture"] = _front_architectures(run_dir, df)
        parts.append(df.assign(source="front.csv"))
    current = json.loads(json.dumps(inputs, default=str)) if inputs is not None else _current_row_inputs(run_dir)
    for sub in ("front_rows", "baselines/rows"):
        files = sorted((run_dir / sub).glob("*.json")) if (run_dir / sub).is_dir() else []
        if sub == "baselines/rows":
            _warn_missing_baseline_rows(run_dir, {p.stem for p in files})
        found = [row for row in map(_model_row, files) if row is not None and _row_is_current(row, current, sub, run_dir)]
        if sub == "baselines/rows" and exclude:
            for row in [r for r in found if r.get("name") in exclude]:
                warnings.warn(f"{row['name']} ({sub}): {exclude[row['name']]}, so it is left out of the front as out "
                              f"of baselines.csv (`puzzle baselines --out {shell_arg(run_dir)}` builds greedy's child "
                              "again)")
            found = [r for r in found if r.get("name") not in exclude]
        if found:
            parts.append(pd.DataFrame(found).assign(source=sub))
    if not parts:
        raise FileNotFoundError(f"{run_dir} has no front.csv, front_rows/ or baselines/rows/: run `puzzle front` first")
    scaled, orphans = [], []
    parents = [part[part["name"] == "parent"] for part in parts]
    reference = next((float(p["throughput_tok_s"].iloc[0]) for p in parents if len(p)), None)
    for part, parent in zip(parts, parents):
        source = part["source"].iloc[0]
        if not len(parent) and source != "front.csv":  # its rows' speed-ups still hold (each against its own parent)
            orphans.append(source)  # said below, once the one session (which needs no parent row) is applied
        if reference is not None:
            part = part.assign(throughput_tok_s=reference * part["speedup"])
        scaled.append(part)
    rows = pd.concat(scaled, ignore_index=True)
    twice = rows[rows["name"].duplicated(keep=False) & rows["name"].ne("parent")]
    for name, copies in twice.groupby("name", sort=False):  # the parent's row is in every source by design
        if copies[["speedup", "kl_nats"]].drop_duplicates().shape[0] > 1:
            warnings.warn(f"model {name} has rows in {' and '.join(copies['source'])} with other figures; drawing the "
                          f"one in {copies['source'].iloc[0]}")
    rows = rows.drop_duplicates("name")
    columns = ["name", "method", "training", "speedup", "throughput_tok_s", "kl_nats", "predicted_kl_nats", "lm_loss",
               "params", "architecture", "source"]
    from .one_session import apply_one_session

    session_rounds = None
    if with_one_session:  # `puzzle front --one-session`'s timing
        rows = apply_one_session(rows.reset_index(drop=True), run_dir, current)
        session_rounds = rows.attrs.get("session_rounds")
    if "timing" in rows.columns:
        columns += ["timing", "speedup_own_session", "runtime_ms", "runtime_iqr_ms"]
        # the session's parent, as its speed-ups are (breaker: front.csv's busy 45 tok/s times them, the session's
        # parent ran at 901)
        reference = rows.attrs.get("session_parent_tok_s") or reference
        if reference is not None:
            rows["throughput_tok_s"] = reference * rows["speedup"]
    for source in orphans:
        own = rows["source"].eq(source) & (rows["timing"].ne("one session") if "timing" in rows.columns else True)
        if not own.any():  # every model of it timed in the one session: its parent row is not needed
            continue
        fused = rows.loc[own, "method"].eq("ffn_fusion")
        command = (f"baselines --out {shell_arg(run_dir)}" if source.startswith("baselines")
                   else f"fuse --out {shell_arg(run_dir)} --name {rows.loc[own, 'name'].iloc[0].removesuffix('-fused')}"
                   if fused.all() else f"refine --out {shell_arg(run_dir)} --name NAME")
        warnings.warn(f"{run_dir / source / 'parent.json'} is missing: the parent's row of {source}; "
                      f"{', '.join(rows.loc[own, 'name'])} {'is' if own.sum() == 1 else 'are'} drawn from "
                      f"{'its' if own.sum() == 1 else 'their'} own session's speed-up"
                      + ("" if reference is not None else " but without a throughput (no parent row anywhere)")
                      + f"; `puzzle {command}` writes it again")
    rows = rows.reindex(columns=columns)
    if with_downstream:
        from .downstream import downstream_rows

        acc = downstream_rows(run_dir)
        if len(acc):
            rows = _without_stale_downstream(rows.merge(acc, on="name", how="left"), Path(run_dir))
    order = rows["name"].ne("parent")
    rows = rows.assign(_o=order).sort_values(["_o", "method", "training", "speedup"], kind="stable") \
        .drop(columns="_o").reset_index(drop=True)
    rows.attrs["session_rounds"] = session_rounds  # the one session's rounds (its ratio intervals), None without it
    return rows


BASELINE_METHODS = ("greedy", "layer_removal", "attention_removal", "uniform_width")


def _without_stale_downstream(rows: pd.DataFrame, run_dir: Path) -> pd.DataFrame:
    """`rows` merged with `downstream.downstream_rows` by name, the downstream figures blanked (with a warning)
    where they were measured on another model of that name: another architecture (a child solved again under its
    name: a row without an architecture, as front.csv's, has its DIR/search record's) or library stage; the
    evaluated model's columns dropped. Results of earlier versions, which recorded neither, are kept."""
    acc_columns = [c for c in rows.columns if c.startswith(("downstream_", "acc_"))
                   and c not in ("downstream_architecture", "downstream_stage")]
    stage = rows["training"].map(lambda t: "init" if t == "init" else "bld")  # as `downstream.front_model_specs` builds
    now = rows["architecture"].where(rows["architecture"].notna(),
                                     rows["name"].map(lambda n: _searched_architecture(run_dir, n)))
    arch, saved_stage, child = rows["downstream_architecture"], rows["downstream_stage"], rows["name"] != "parent"
    stale = child & ((arch.notna() & now.notna() & (arch != now))
                     | (saved_stage.notna() & rows["training"].notna() & (saved_stage != stage)))
    if stale.any():
        names = list(rows.loc[stale, "name"])
        warnings.warn(f"downstream accuracy of {', '.join(names)} was measured on another model of that name (an "
                      f"earlier search or library stage) and is left out: `puzzle front --downstream TASKS` with the "
                      f"same tasks measures {'it' if len(names) == 1 else 'them'} again")
        rows.loc[stale, acc_columns] = math.nan
    return rows.drop(columns=["downstream_architecture", "downstream_stage"])


def _number(value):
    """`value` as a float when it is a number or a text that reads as one (a column pandas read as text), else None."""
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return None


def _finite(value) -> bool:
    try:
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    except OverflowError:  # a whole number beyond float range
        return False


#: the largest speed-up and evaluation KL (nats) a row may hold: beyond them a file was edited by hand
PLAUSIBLE_SPEEDUP, PLAUSIBLE_KL = 1e4, 1e4


def _step_architecture(step: dict, run_dir: Path) -> str | None:
    """The architecture (compact form) DIR/search/<name>.json holds now for a step of DIR/refine/<name>.summary.csv,
    or None when the record is not that step's: another architecture than the step's, or, in a summary written
    before steps named theirs, another predicted KL (or no readable record)."""
    from .io import read_json
    from .pipeline import compact_architecture

    try:
        record = read_json(run_dir / "search" / f"{step['name']}.json")
        choice, kl = compact_architecture(record["choice"]), float(record["kl_nats"])
    except (PuzzleError, KeyError, TypeError, ValueError, AttributeError):
        return None
    if isinstance(step.get("architecture"), str):
        return choice if step["architecture"] == choice else None
    return choice if math.isclose(float(step.get("predicted_kl_nats", math.nan)), kl, rel_tol=1e-9) else None


def selected_children(run_dir: str | Path, rows: pd.DataFrame) -> pd.DataFrame:
    """Ours as a user takes them after `puzzle refine`: each plain MIP child is replaced by the plain, diverse or
    refined one with the lowest scoring-split KL (DIR/refine/<name>.summary.csv, where the three were scored on the
    same tokens; the evaluation split plays no part in the choice), where the picked one has a measured row
    (`refine.measure_steps`). A summary whose steps are not the records DIR/search/ holds now (the child was
    searched or refined again since) is passed over, and so is a measured row of another architecture.

    Args:
        rows: `front_rows` (name, method, training, speedup, kl_nats, architecture).

    Returns:
        One row per plain child (method "mip", training "bld"), the picked model's figures under its own name,
        method "mip" and picked_from the plain child's name; attrs["passed_over"]: {plain child: why its
        refinement was not used} for each summary passed over.
    """
    run_dir = Path(run_dir)
    measured = {r["name"]: r for r in rows.to_dict("records")}
    out, passed_over = [], {}
    for row in rows[(rows["method"] == "mip") & (rows["training"] == "bld")].to_dict("records"):
        name, pick, path = row["name"], row, run_dir / "refine" / f"{row['name']}.summary.csv"
        try:
            steps = pd.read_csv(path).to_dict("records") if path.is_file() else []
        except (OSError, ValueError, pd.errors.ParserError):
            steps = []
        named = [st for st in steps if isinstance(st.get("name"), str)]
        # refine scores every step: a KL that is missing, not a number or negative (no model has one) is damage
        kl = [_number(st.get("score_kl_nats")) for st in named]
        bad = [st for st, v in zip(named, kl) if not (_finite(v) and v >= 0)]
        scored = [{**st, "score_kl_nats": v} for st, v in zip(named, kl) if _finite(v) and v >= 0]
        now = {st["name"]: _step_architecture(st, run_dir) for st in scored}
        if path.is_file() and not named:
            passed_over[name] = f"{path} holds no steps"
        elif len(named) < len(steps):  # refine names every step it writes
            passed_over[name] = f"{path} holds a step without a name"
        elif bad:
            value = bad[0].get("score_kl_nats")
            passed_over[name] = (f"{path} gives {bad[0]['name']} " + ("no scoring-split KL" if value is None else
                                 f"the scoring-split KL {value!r}, not a number >= 0"))
        elif scored and not (scored[0]["name"] == name and None not in now.values()):
            passed_over[name] = f"its refinement ({path}) is of an earlier search of it"
        elif scored:
            best = min(scored, key=lambda st: st["score_kl_nats"])
            found = measured.get(best["name"])
            if best["name"] != name:
                if found is not None and _finite(found.get("speedup")) and _finite(found.get("kl_nats")) \
                        and found.get("architecture") == now[best["name"]]:  # timed and evaluated as it is now
                    pick = found
                else:
                    passed_over[name] = f"{best['name']}, the step it picks, has no timed row of its architecture"
        out.append({**pick, "method": "mip", "picked_from": name})
    selected = pd.DataFrame(out, columns=[*rows.columns, "picked_from"])
    selected.attrs["passed_over"] = passed_over
    return selected


def front_ratios(rows: pd.DataFrame, speedups=(1.25, 1.5, 2.0), selected: pd.DataFrame | None = None,
                 rounds: int | None = None) -> pd.DataFrame:
    """Our front's evaluation KL divided by each baseline's, at matched measured speed-up.

    Ours are first the plain searched children (method "mip"; ours = "plain MIP"): nothing picked by
    its evaluation KL beyond `matched_ratios`' monotone envelope, which every front gets alike. With
    `selected` (`selected_children`) where it picked a diverse or refined child, the same again with
    those in place of the plain ones (ours = "selected per target"). Baselines are the methods of
    `BASELINE_METHODS`, per training ("init" as built, "bld" after the same local distillation).
    Speed-ups are each model's measured one against the parent of its own session (or of one session
    for all, `puzzle front --one-session`); `matched_ratios` interpolates linearly and never extrapolates.

    Args:
        rows: `front_rows` (name, method, training, speedup, kl_nats; the parent's row).
        speedups: matched speed-ups (x the parent's throughput).
        selected: `selected_children(run_dir, rows)`, or None.
        rounds: with every model timed in one session (runtime_ms and runtime_iqr_ms in `rows`), its timing rounds:
            the ratios then carry that session's timing noise as 5-95 % intervals (`matched_ratio_intervals`).

    Returns:
        One row per (ours, speedup, method, training) with ours_kl_nats, baseline_kl_nats and ratio
        (NaN where a front does not reach the speed-up), and where each KL comes from (`matched_ratios`:
        ours_from, baseline_from, ours_gap, baseline_gap), and same_model (`_same_models`); with `rounds` also
        ratio_lo, ratio_median, ratio_hi and reached. Empty when the rows hold no baseline.
    """
    keep = rows["method"].isin(("parent", "mip") + BASELINE_METHODS)
    columns = ["speedup", "method", "training", "ours_kl_nats", "baseline_kl_nats", "ratio", "ours", "ours_from",
               "baseline_from", "ours_gap", "baseline_gap"] + (
        ["ratio_lo", "ratio_median", "ratio_hi", "reached"] if rounds else [])
    if not rows.loc[keep, "method"].isin(BASELINE_METHODS).any() or not (rows["method"] == "mip").any():
        return pd.DataFrame(columns=columns + ["same_model"])
    speedups = tuple(sorted({float(s) for s in speedups}))

    def ratios(part: pd.DataFrame) -> pd.DataFrame:
        if rounds:
            return matched_ratio_intervals(part, speedups, rounds=rounds, ours="mip", y="kl_nats")
        return matched_ratios(part, speedups, ours="mip", y="kl_nats")

    parts = [ratios(rows[keep]).assign(ours="plain MIP")]
    if selected is not None and len(selected) and (selected["name"] != selected["picked_from"]).any():
        theirs = rows[rows["method"].isin(("parent",) + BASELINE_METHODS)]
        parts.append(ratios(pd.concat([theirs, selected.drop(columns="picked_from")], ignore_index=True))
                     .assign(ours="selected per target"))
    out = pd.concat(parts, ignore_index=True)
    models = pd.concat([rows, selected], ignore_index=True) if selected is not None else rows
    model = _model_keys(models)  # once, not per ratio row (stop 76's leftover)
    out["same_model"] = [_same_models(o, b, model) for o, b in zip(out["ours_from"], out["baseline_from"])]
    return out[columns + ["same_model"]]


def _model_keys(rows: pd.DataFrame) -> dict[str, tuple]:
    """{name: (architecture, training)} of the rows but the parent's: one model is one such key ({} without an
    architecture column)."""
    if "architecture" not in rows.columns:
        return {}
    training = rows["training"] if "training" in rows.columns else [None] * len(rows)
    return {str(n): (a, t) for n, a, t in zip(rows["name"], rows["architecture"], training)
            if isinstance(a, str) and a and n != "parent"}  # one model: its layers and its training (reviewer:
    # "parent=parent", an init-only twin's layers)


def _same_models(ours_from: str, baseline_from: str, model: dict[str, tuple]) -> str:
    """The baseline models a ratio reads that have the architecture of a model our KL there comes from, as
    "greedy-1.25x=child-1.25x" ("" where none): one model, timed at two speed-ups, on both sides of a ratio
    (reviewer: greedy's 1.25x child, ours measured apart, gave a ratio of 12.98 between a model and itself).
    `model`: `_model_keys` of the rows the ratios read."""
    names = lambda text: [part.rsplit("@", 1)[0] for part in str(text or "").split("..") if part]  # noqa: E731
    ours = {model[n]: n for n in names(ours_from) if n in model}
    return ", ".join(f"{n}={ours[model[n]]}" for n in names(baseline_from) if model.get(n) in ours)


def ratio_table(ratios: pd.DataFrame) -> str:
    """`front_ratios` as text: one line per baseline, one column per speed-up ("-": not reached); one block per
    `ours` (plain MIP children, then the selected ones where `front_ratios` has them); each ratio with its 5-95 %
    interval where `front_ratios` has one (a front timed in one session)."""
    if ratios.empty:
        return "(no baseline to compare with: run `puzzle baselines` first, or again where a warning left its rows out)"
    trained = {"init": ", as initialised", "bld": ", after BLD"}
    heads = {"plain MIP": "ours (plain MIP) / baseline",
             "selected per target": "ours (plain, diverse or refined, by scoring KL) / baseline"}
    if "ours" not in ratios.columns:
        ratios = ratios.assign(ours="plain MIP")
    blocks = []
    for ours, part in ratios.groupby("ours", sort=False):
        table = part.assign(baseline=[LABELS.get(m, m) + trained.get(t, "") for m, t in zip(part["method"], part["training"])],
                            at=part["speedup"].map(lambda s: f"{s:g}x"))
        wide = table.pivot_table(index="baseline", columns="at", values="ratio", sort=False, dropna=False)
        head = heads.get(ours, f"ours ({ours}) / baseline") if ratios["ours"].nunique() > 1 else "ours / baseline"
        width = max(len(head), *map(len, wide.index))
        cells = {(b, a): _ratio_cell(r) for b, a, r in zip(table["baseline"], table["at"], table.itertuples())}
        col = max(8, *(len(c) + 2 for c in cells.values()))  # wider with the intervals of one timing session
        lines = [head.ljust(width) + "".join(f"{c:>{col}}" for c in wide.columns)]
        for label in wide.index:
            lines.append(label.ljust(width) + "".join(f"{cells.get((label, c), '-'):>{col}}" for c in wide.columns))
        blocks.append("\n".join(lines))
    notes = ["-: the baseline does not reach that speed-up; ours -: our front does not; both -: neither does; 0/0: "
             "both KLs are 0; inf: only the baseline's is"]
    if "ratio_lo" in ratios.columns and ratios["ratio_lo"].notna().any():
        notes.append("(lo-hi): 5-95 % interval of the ratio from the timing noise of the one session (bootstrap of "
                     "each model's runtime median, `plots.matched_ratio_intervals`; the KLs are held fixed)")
    if "reached" in ratios.columns and (ratios.dropna(subset=["ratio_lo"])["reached"] < PARTLY_REACHED).any():
        notes.append("(lo-hi, N%): both fronts reach that speed-up in only N% of the timing-noise draws; the interval "
                     "is over those draws, so the ratio itself can lie outside it")
    if any(map(_far, ratios.itertuples())):
        notes.append(f"~: our or the baseline's nearest measured model is more than {FAR_FROM_TARGET:g}x faster or "
                     f"slower than that speed-up, so its KL there is interpolated (from the parent at 1x and KL 0 where "
                     f"the front's slowest model is faster): a figure no measured model has (front_ratios.csv: "
                     f"ours_from, baseline_from)")
    if "same_model" in ratios.columns and any(isinstance(v, str) and v for v in ratios["same_model"]):
        notes.append("=: the ratio reads one model on both sides, timed at two speed-ups (front_ratios.csv: "
                     "same_model): it measures the timing noise between them, not the methods")
    if absent := [LABELS[m] for m in BASELINE_METHODS if m not in set(ratios["method"])]:
        notes.append(f"no measured model: {', '.join(absent)} (`puzzle baselines` built none at these targets, has "
                     f"not run, or its rows were left out as stale, which a warning above then says)")
    return "\n\n".join(blocks) + "\n" + "\n".join(notes)


def _far(row) -> bool:
    """Whether a `front_ratios` row's ratio rests on a front whose nearest measured model is more than
    FAR_FROM_TARGET away from the speed-up (rows without the gap columns: False)."""
    gaps = [getattr(row, c, math.nan) for c in ("ours_gap", "baseline_gap")]
    return any(isinstance(g, float) and g > FAR_FROM_TARGET for g in gaps)


PARTLY_REACHED = 0.95  # a ratio interval over fewer of the timing-noise draws than this says how many


def _ratio_cell(row) -> str:
    """A ratio table cell: the ratio, or why there is none (`ratio_table`'s notes)."""
    ratio, ours, theirs = (getattr(row, c, math.nan) for c in ("ratio", "ours_kl_nats", "baseline_kl_nats"))
    if isinstance(ratio, float) and math.isfinite(ratio):
        lo, hi, reached = (getattr(row, c, math.nan) for c in ("ratio_lo", "ratio_hi", "reached"))
        some = f", {reached:.0%}" if _finite(reached) and reached < PARTLY_REACHED else ""  # breaker: 0.60 (0.07-0.59)
        interval = f" ({lo:.2f}-{hi:.2f}{some})" if _finite(lo) and _finite(hi) else ""
        same = getattr(row, "same_model", "")
        return f"{ratio:.2f}" + ("~" if _far(row) else "") + ("=" if isinstance(same, str) and same else "") + interval
    reached = [_finite(v) for v in (ours, theirs)]
    if not any(reached):  # a math checker: "-" blamed the baseline where our front did not reach it either
        return "both -"
    if not reached[1]:
        return "-"
    if not reached[0]:
        return "ours -"
    return ("0/0" if ours == 0 else "inf") if theirs == 0 else "-"


def current_front_rows(run_dir: str | Path, with_downstream: bool = True) -> pd.DataFrame:
    """`front_rows` as `puzzle front` draws them (the notebook's rows): the baselines' and refine's rows only where
    made for the run's workload, score table and evaluation split as they are now (`baselines.row_inputs`), and no
    greedy row that greedy no longer picks (`baselines.stale_greedy_rows`). front.csv's rows are taken as they are
    (`puzzle front` or `puzzle run` draws a stale front.csv again). Opens the run directory's configuration and token
    splits, not its parent.

    Raises:
        PuzzleError: `run_dir` is no run directory; FileNotFoundError: as `front_rows`.
    """
    from .baselines import open_run, row_inputs, stale_greedy_rows
    from .pipeline import front_csv_damaged, front_is_current

    run = open_run(Path(run_dir), progress=False)
    if (why := front_csv_damaged(run.out)) is not None:  # breaker: a cut front.csv drew a front without our children
        warnings.warn(f"{why}, so its rows are drawn as they stand: `puzzle front --out {shell_arg(run.out)}` writes "
                      "it again (from the measurement when current)")
    elif not (run.out / "front.csv").is_file():  # breaker: the notebook drew the baselines alone as the run's front
        warnings.warn(f"{run.out / 'front.csv'} is missing, so the front holds no child of ours: `puzzle front --out "
                      f"{shell_arg(run.out)}` writes it (from summary.csv when current, else by measuring the "
                      "children)")
    elif (why := front_is_current(run)) is not None:  # breaker: a front timed at batch 2 drawn after a rescore at 16
        warnings.warn(f"{run.out / 'front.csv'} is out of date ({why}), so its rows are drawn as they stand: "
                      f"`puzzle front --out {shell_arg(run.out)}` brings it up to date")
    return front_rows(run_dir, with_downstream, inputs=row_inputs(run), exclude=stale_greedy_rows(run))


def searched_choices(run_dir: str | Path) -> dict[str, list[str]]:
    """{name: choice (block ids per layer)} of the run's searched children (DIR/search/chosen.json's names), fastest
    predicted last: what `architecture_map` draws.

    Raises:
        PuzzleError: no readable chosen.json or child record, naming the command that writes it.
    """
    from .io import read_json
    from .pipeline import searched_names

    search = Path(run_dir) / "search"
    names = searched_names(Path(run_dir))
    if not names:
        raise PuzzleError(f"{search / 'chosen.json'} is missing, unreadable or names no child: `puzzle search --out "
                          f"{shell_arg(run_dir)}` writes it")
    children = {}
    for name in names:
        try:
            record = read_json(search / f"{name}.json")
            children[name] = (float(record.get("speedup", 0.0)), [str(b) for b in record["choice"]])
        except (PuzzleError, OSError, AttributeError, KeyError, TypeError, ValueError):
            raise PuzzleError(f"{search / (name + '.json')} is missing or damaged (no choice of blocks): `puzzle "
                              f"search --out {shell_arg(run_dir)}` writes it again") from None
    return {name: choice for name, (_, choice) in sorted(children.items(), key=lambda kv: kv[1][0])}


def parent_block_of(run_dir: str | Path) -> BlockConfig:
    """The parent's block of a run directory (its score table's parent rows of layer 0), for `architecture_map`'s
    shading.

    Raises:
        PuzzleError: the run has no readable score table (`puzzle score` writes it).
    """
    from .mip import as_bool

    path = Path(run_dir) / "score" / "score_table.csv"
    try:
        table = pd.read_csv(path)
        own = table[(table["layer"] == 0) & as_bool(table["is_parent"])].set_index("subblock")["variant"]
        return BlockConfig.from_id(f"{own['attention']}+{own['ffn']}")
    except (OSError, ValueError, KeyError, pd.errors.ParserError) as e:
        raise PuzzleError(f"{path} has no parent rows to read the parent's block from ({e}); run `puzzle score` "
                          f"first") from None


def write_front_all(run_dir: str | Path, title: str | None = None, speedups=None,
                    inputs: dict | None = None, exclude: dict[str, str] | None = None) -> pd.DataFrame:
    """DIR/front_all.csv and DIR/front_all.png: every realized model of the run (our children and,
    where `puzzle baselines` / `puzzle refine` ran, theirs), measured throughput vs evaluation KL.
    With `speedups`, also DIR/front_ratios.csv: `front_ratios` at those speed-ups (attrs["ratios"]).

    Returns the rows (`front_rows`, with `inputs` and `exclude`). Raises FileNotFoundError when the run has no front
    yet.
    """
    from .io import atomic_write_text

    run_dir = Path(run_dir)
    rows = front_rows(run_dir, inputs=inputs, exclude=exclude)
    atomic_write_text(run_dir / "front_all.csv", rows.to_csv(index=False))
    if speedups is not None:
        selected = selected_children(run_dir, rows)
        one = "timing" in rows.columns and (rows["timing"] == "one session").all()  # noise of one session only
        rounds = rows.attrs.get("session_rounds") if one else None
        ratios = front_ratios(rows, speedups, selected=selected, rounds=rounds)
        ratios.attrs["passed_over"] = selected.attrs["passed_over"]
        atomic_write_text(run_dir / "front_ratios.csv", ratios.to_csv(index=False))
        rows.attrs["ratios"] = ratios
    front_plot(rows, run_dir / "front_all.png", title=title or f"front of {run_dir.name}: every model",
               xlabel="measured speed-up x the run's parent throughput (generated tokens/s at its workload)")
    return rows
