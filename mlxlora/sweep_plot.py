"""Draw a sweep's results as one PNG: loss against learning rate, and the best loss curves.

Uses matplotlib's object-oriented API with the Agg canvas, so plotting never opens a
window and never changes the pyplot backend of a program that imports mlxlora.
"""

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mlxlora.sweep_report import finished

# Loss curves of this many best points are drawn in the right-hand panel.
BEST_CURVES = 3
# Train losses are averaged over windows of about this fraction of the budget, so curves of
# small and large batch sizes are equally smooth.
SMOOTHING_FRACTION = 0.1


def series_label(batch_size: int, rank: int, ranks: set[int]) -> str:
    return f"batch {batch_size}" + (f", rank {rank}" if len(ranks) > 1 else "")


def smoothed_curve(point: dict) -> tuple[np.ndarray, np.ndarray]:
    """Return (examples seen before each step, moving-average train loss), skipping NaN steps.

    A step's train loss is computed before its update, so it belongs to the examples seen
    before that step.
    """
    losses = np.array([np.nan if x is None else x for x in point["train_losses"]], dtype=float)
    per_step = point["examples_seen"] / max(point["steps"], 1)
    budget = max(point["examples_seen"], 1)
    window = max(1, round(SMOOTHING_FRACTION * budget / per_step))

    values = []
    for end in range(1, len(losses) + 1):
        chunk = losses[max(0, end - window):end]
        chunk = chunk[np.isfinite(chunk)]
        values.append(chunk.mean() if chunk.size else np.nan)
    examples = per_step * np.arange(len(losses))
    return examples, np.array(values)


def draw_learning_rates(axes, result: dict) -> None:
    points = result["points"]
    ranks = {p["rank"] for p in points}
    good = finished(points)
    top = max([p["val_loss"] for p in good] + [result["start_val_loss"]])

    pairs = sorted({(p["rank"], p["batch_size"]) for p in points})
    for number, (rank, batch_size) in enumerate(pairs):
        line = sorted((p for p in points if p["batch_size"] == batch_size
                       and p["rank"] == rank), key=lambda p: p["learning_rate"])
        ok = [p for p in line if p in good]
        diverged = [p for p in line if p not in good]
        plotted = axes.plot([p["learning_rate"] for p in ok], [p["val_loss"] for p in ok],
                            marker="o", label=series_label(batch_size, rank, ranks))
        # Diverged points have no loss: they go above the highest loss, one row per series.
        height = top * (1.05 + 0.04 * number)
        axes.scatter([p["learning_rate"] for p in diverged], [height] * len(diverged),
                     marker="x", s=60, color=plotted[0].get_color())

    best = (result.get("recommendation") or {}).get("learning_rate")
    if best is not None:
        axes.scatter([best], [result["recommendation"]["val_loss"]], marker="*", s=250,
                     color="gold", edgecolors="black", zorder=5, label="best")
    axes.axhline(result["start_val_loss"], color="grey", linestyle="--", linewidth=1,
                 label="start (base model)")
    axes.set_xscale("log")
    axes.set_xlabel("peak learning rate")
    axes.set_ylabel("validation loss")
    axes.set_title("Validation loss by learning rate (x: diverged)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)


def draw_best_curves(axes, result: dict) -> None:
    ranked = sorted(finished(result["points"]), key=lambda p: p["val_loss"])[:BEST_CURVES]
    ranks = {p["rank"] for p in result["points"]}
    for point in ranked:
        examples, values = smoothed_curve(point)
        label = (f"lr {point['learning_rate']:.3g}, "
                 f"{series_label(point['batch_size'], point['rank'], ranks)}")
        plotted = axes.plot(examples, values, label=f"{label} (train)")
        curve = [pair for pair in point["val_curve"] if pair[1] is not None]
        axes.plot([0] + [pair[0] for pair in curve],
                  [result["start_val_loss"]] + [pair[1] for pair in curve],
                  marker="o", linestyle="none", color=plotted[0].get_color(),
                  label=f"{label} (val)")
    axes.set_xlabel("training examples seen")
    axes.set_ylabel("loss")
    axes.set_title(f"Loss curves of the best {len(ranked)} points")
    axes.grid(True, alpha=0.3)
    if ranked:
        axes.legend(fontsize=8)


def plot_sweep(result: dict, path: Path) -> Path:
    """Write the two-panel PNG of a sweep result (the content of sweep.json) to ``path``."""
    figure = Figure(figsize=(13, 5), dpi=100)
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    draw_learning_rates(left, result)
    draw_best_curves(right, result)
    figure.suptitle(f"mlxlora sweep: {result['settings']['config'].get('model', '')}", fontsize=10)
    # Fixed margins: tight_layout measures every label and took about a second per plot.
    figure.subplots_adjust(left=0.06, right=0.98, bottom=0.11, top=0.87, wspace=0.2)
    figure.savefig(path, format="png")
    return Path(path)
