"""Read a sweep's results: the terminal table, the recommendation and the next command.

All functions take the point dicts stored in sweep.json, so a finished or interrupted sweep
can be reported again without training.
"""

import shlex
from dataclasses import asdict, dataclass

from mlxlora.config import flag_name
from mlxlora.sweep_grid import GRID_FIELDS

# Learning rates whose validation loss is within this fraction of the best one count as
# equally good when describing how flat the optimum is.
FLAT_TOLERANCE = 0.02


@dataclass
class Recommendation:
    """The best grid point and how much worse the neighbouring learning rates are.

    ``lower_change`` and ``higher_change`` are the relative increases in validation loss at
    the next lower and higher learning rate of the same batch size and rank (None at a grid
    edge or when that point diverged). ``near_best`` is the range of adjacent learning rates
    within FLAT_TOLERANCE of the best loss. ``edge`` is "low" or "high" when the best rate
    is the lowest or highest of its series, and ``next_range`` then proposes new --lrs.
    """

    key: str
    learning_rate: float
    batch_size: int
    rank: int
    val_loss: float
    start_val_loss: float
    lower_change: float | None
    higher_change: float | None
    near_best: tuple[float, float]
    edge: str | None
    next_range: str | None
    command: str

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, content: dict | None) -> "Recommendation | None":
        """Rebuild a recommendation read from sweep.json; None stays None."""
        if content is None:
            return None
        return cls(**{**content, "near_best": tuple(content["near_best"])})


def finished(points: list[dict]) -> list[dict]:
    return [p for p in points if p["status"] == "ok" and p["val_loss"] is not None]


def series(points: list[dict], batch_size: int, rank: int) -> list[dict]:
    """Return the points of one batch size and rank, by increasing learning rate."""
    chosen = [p for p in points if p["batch_size"] == batch_size and p["rank"] == rank]
    return sorted(chosen, key=lambda p: p["learning_rate"])


def relative_change(point: dict, best_loss: float) -> float | None:
    if point["status"] != "ok" or point["val_loss"] is None:
        return None
    return point["val_loss"] / best_loss - 1.0


def near_best_range(line: list[dict], index: int) -> tuple[float, float]:
    """Return the lowest and highest rate of the adjacent points within FLAT_TOLERANCE."""
    limit = line[index]["val_loss"] * (1.0 + FLAT_TOLERANCE)

    def good(position: int) -> bool:
        point = line[position]
        return point["status"] == "ok" and point["val_loss"] is not None \
            and point["val_loss"] <= limit

    low = index
    while low > 0 and good(low - 1):
        low -= 1
    high = index
    while high < len(line) - 1 and good(high + 1):
        high += 1
    return line[low]["learning_rate"], line[high]["learning_rate"]


def propose_range(line: list[dict], index: int, edge: str) -> str:
    """Return --lrs START:STOP:COUNT that keeps the grid's spacing and moves past the edge.

    The best rate becomes the second value from the end that was the edge, so the new range
    brackets it again.
    """
    rates = [p["learning_rate"] for p in line]
    count = len(rates)
    neighbour = rates[index - 1] if edge == "high" else rates[index + 1]
    ratio = max(rates[index], neighbour) / min(rates[index], neighbour)
    best = rates[index]
    if edge == "high":
        start, stop = best / ratio, best * ratio ** (count - 2)
    else:
        start, stop = best / ratio ** (count - 2), best * ratio
    return f"{start:.3g}:{stop:.3g}:{count}"


def recommend(points: list[dict], start_val_loss: float, recipe: str | None,
              flags: dict) -> Recommendation | None:
    """Pick the point with the lowest validation loss; None when every point diverged."""
    candidates = finished(points)
    if not candidates:
        return None
    best = min(candidates, key=lambda p: (p["val_loss"], p["learning_rate"]))
    line = series(points, best["batch_size"], best["rank"])
    index = next(i for i, p in enumerate(line) if p["key"] == best["key"])

    lower = relative_change(line[index - 1], best["val_loss"]) if index > 0 else None
    higher = (relative_change(line[index + 1], best["val_loss"])
              if index < len(line) - 1 else None)
    edge = None
    if len(line) > 1 and index == 0:
        edge = "low"
    elif len(line) > 1 and index == len(line) - 1:
        edge = "high"

    return Recommendation(
        key=best["key"], learning_rate=best["learning_rate"], batch_size=best["batch_size"], rank=best["rank"],
        val_loss=best["val_loss"], start_val_loss=start_val_loss, lower_change=lower,
        higher_change=higher, near_best=near_best_range(line, index), edge=edge,
        next_range=propose_range(line, index, edge) if edge else None,
        command=train_command(recipe, flags, best))


def render_flag(name: str, value) -> list[str]:
    """Return the command-line words that set config field ``name`` to ``value``."""
    flag = flag_name(name)
    if isinstance(value, bool):
        return [flag if value else f"--no-{flag[2:]}"]
    if isinstance(value, list):
        return [flag, ",".join(str(v) for v in value)]
    return [flag, str(value)]


def train_command(recipe: str | None, flags: dict, best: dict) -> str:
    """Return the `mlxlora train` command with the sweep's own options and the best point."""
    words = ["mlxlora", "train"]
    if recipe:
        words += ["--recipe", recipe]
    for name, value in flags.items():
        if value is not None and name not in GRID_FIELDS:
            words += render_flag(name, value)
    words += ["--learning-rate", f"{best['learning_rate']:.3g}",
              "--batch-size", str(best["batch_size"]), "--rank", str(best["rank"])]
    return shlex.join(words)


def describe(recommendation: Recommendation | None) -> list[str]:
    """Return the recommendation as lines of plain text."""
    if recommendation is None:
        return ["Every grid point diverged: lower the learning rates (e.g. --lrs with values "
                "10x smaller) or check the data."]

    r = recommendation
    gain = 1.0 - r.val_loss / r.start_val_loss
    lines = [f"Best: learning rate {r.learning_rate:.3g}, batch size {r.batch_size}, rank "
             f"{r.rank}: validation loss {r.val_loss:.4f} ({gain:.0%} below the start, "
             f"{r.start_val_loss:.4f})."]

    low, high = r.near_best
    if high / low > 1.0 + 1e-9:
        lines.append(f"Flat optimum: learning rates from {low:.3g} to {high:.3g} "
                     f"({high / low:.1f}x) are within {FLAT_TOLERANCE:.0%} of the best loss.")
    else:
        lines.append(f"Sharp optimum: no neighbouring learning rate is within "
                     f"{FLAT_TOLERANCE:.0%} of the best loss.")
    neighbours = []
    if r.lower_change is not None:
        neighbours.append(f"the next lower rate is {r.lower_change:+.1%}")
    if r.higher_change is not None:
        neighbours.append(f"the next higher rate is {r.higher_change:+.1%}")
    if neighbours:
        lines.append("In validation loss, " + " and ".join(neighbours) + ".")

    if r.edge:
        direction = "highest" if r.edge == "high" else "lowest"
        lines.append(f"The best learning rate is the {direction} in the grid, so the optimum "
                     f"may lie beyond it. Next range to try: --lrs {r.next_range}")
    lines.append(f"Next: {r.command}")
    return lines


def format_loss(point: dict | None) -> str:
    if point is None:
        return "-"
    if point["status"] != "ok":
        return f"diverged@{point['steps']}"
    return f"{point['val_loss']:.4f}"


def format_table(points: list[dict], start_val_loss: float, best_key: str | None) -> str:
    """Return one table per rank: a row per learning rate, a column per batch size.

    A cell contains the final validation loss, or "diverged@N" for a point stopped at step
    N, or "-" for a point not run. A "*" marks the best point.
    """
    budget = max((p["examples_seen"] for p in points if p["status"] == "ok"), default=0)
    lines = [f"Validation loss after {budget} training examples per point "
             f"(start: {start_val_loss:.4f}):"]

    for rank in sorted({p["rank"] for p in points}):
        chosen = [p for p in points if p["rank"] == rank]
        batch_sizes = sorted({p["batch_size"] for p in chosen})
        rates = sorted({p["learning_rate"] for p in chosen})
        cells = {(p["learning_rate"], p["batch_size"]): p for p in chosen}

        header = [f"rank {rank}: lr"] + [f"batch {b}" for b in batch_sizes]
        rows = [header]
        for rate in rates:
            row = [f"{rate:.3g}"]
            for batch_size in batch_sizes:
                point = cells.get((rate, batch_size))
                mark = "*" if point and point["key"] == best_key else ""
                row.append(format_loss(point) + mark)
            rows.append(row)
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines.append("")
        for row in rows:
            lines.append("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))
    return "\n".join(lines)
