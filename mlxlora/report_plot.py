"""loss.png: loss curves, learning-rate schedule and speed of one run or several, drawn with
matplotlib's Agg backend (no display needed)."""

from pathlib import Path

from mlxlora.run_facts import Run, is_finite, learning_rate_curve


def plot_runs(runs: list[Run], path: Path) -> None:
    """Draw loss, learning rate and tokens/s of one or more runs into a PNG file."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 8.5), layout="constrained")
    FigureCanvasAgg(figure)
    loss_axes, lr_axes, speed_axes = figure.subplots(3, 1, sharex=True,
                                                     height_ratios=[3, 1.3, 1.3])
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]

    for index, run in enumerate(runs):
        color = colors[index % len(colors)]
        label = run.name if len(runs) > 1 else ""
        plot_losses(loss_axes, run, color, label)
        steps, rates = learning_rate_curve(run)
        lr_axes.plot(steps, rates, color=color)
        speed = [(r["step"], r["tokens_per_second"]) for r in run.train
                 if is_finite(r.get("tokens_per_second"))]
        if speed:
            speed_axes.plot(*zip(*speed), color=color, marker=".")

    loss_axes.set_ylabel("loss (nats per token)")
    loss_axes.set_title("Training and validation loss" if len(runs) == 1
                        else "Loss: " + " vs ".join(run.name for run in runs))
    if loss_axes.get_legend_handles_labels()[0]:
        loss_axes.legend(loc="upper right", fontsize="small")
    loss_axes.grid(alpha=0.3)
    lr_axes.set_ylabel("learning rate")
    lr_axes.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    lr_axes.grid(alpha=0.3)
    speed_axes.set_ylabel("tokens/s")
    speed_axes.set_xlabel("optimizer step")
    speed_axes.grid(alpha=0.3)
    figure.savefig(path, dpi=100)


def plot_losses(axes, run: Run, color: str, label: str) -> None:
    prefix = f"{label}: " if label else ""
    train = [(r["step"], r["train_loss"]) for r in run.train if is_finite(r.get("train_loss"))]
    val = [(r["step"], r["val_loss"]) for r in run.val if is_finite(r.get("val_loss"))]
    if train:
        axes.plot(*zip(*train), color=color, label=prefix + "train loss")
    if val:
        axes.plot(*zip(*val), color=color, linestyle="--", marker="o", markersize=4,
                  label=prefix + "validation loss")
    best = run.best_val
    if best is not None:
        axes.plot([best["step"]], [best["val_loss"]], color=color, marker="*", markersize=14,
                  linestyle="none", label=prefix + f"best validation (step {best['step']})")
