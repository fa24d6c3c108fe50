"""The report of a training run: report.md and loss.png in the run folder.

The report reads only files of the run folder: metrics.jsonl (one line per training report
and per evaluation), training_config.json (the resolved config) and run_summary.json, which
training writes before its first step (parameter counts, data summary, the learning-rate
rule). So `mlxlora report DIR` can rebuild it at any time, also for a run that was stopped.
"""

import json
import logging
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from mlxlora.errors import ConfigError
from mlxlora.files import atomic_write_json, atomic_write_text
from mlxlora.hyperparams import hyperparameter_warnings

logger = logging.getLogger("mlxlora")

METRICS_FILE = "metrics.jsonl"
TRAINING_CONFIG_FILE = "training_config.json"
SUMMARY_FILE = "run_summary.json"
REPORT_FILE = "report.md"
PLOT_FILE = "loss.png"
COMPARE_REPORT_FILE = "compare.md"
COMPARE_PLOT_FILE = "compare.png"

# A validation loss this much above its best, at the last evaluation, reads as overfitting
# rather than noise between evaluations.
OVERFIT_MARGIN = 0.02
# NOTE: a rough floor, not a measured one. Below it the loss was computed on so few tokens
# that the adapter has little to learn from and the validation loss is noisy.
MIN_TRAINED_TOKENS = 10_000
# Peak memory this far above the plan deserves a look at the plan's assumptions.
MEMORY_OVER_PLAN = 1.25


@dataclass
class Run:
    """The records and settings of one run folder."""

    folder: Path
    train: list[dict]
    val: list[dict]
    config: dict = field(default_factory=dict)
    sources: dict = field(default_factory=dict)
    learning_rate: float | None = None
    total_steps: int | None = None
    summary: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def last_step(self) -> int:
        steps = [r["step"] for r in self.train + self.val]
        return max(steps, default=0)

    @property
    def best_val(self) -> dict | None:
        finite = [r for r in self.val if is_finite(r.get("val_loss"))]
        return min(finite, key=lambda r: r["val_loss"], default=None)


def is_finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_json(path: Path) -> dict:
    """Return a JSON file's object, or {} when the file is missing or unreadable."""
    if not path.is_file():
        return {}
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        logger.warning("%s: cannot be read (%s). The report leaves its facts out.", path, error)
        return {}
    return content if isinstance(content, dict) else {}


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """Return the training and validation records, one per step, sorted by step.

    A resumed run appends to metrics.jsonl and may report a step again; the later record
    wins. A line cut short by a killed process is skipped.
    """
    train, val = {}, {}
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("%s:%d: not valid JSON, skipped", path, number)
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            continue
        if "train_loss" in record:
            train[record["step"]] = record
        if "val_loss" in record:
            val[record["step"]] = record
    return [train[s] for s in sorted(train)], [val[s] for s in sorted(val)]


def load_run(folder) -> Run:
    """Read a run folder; raise ConfigError when it contains no metrics.jsonl."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: folder not found. Pass the --adapter-path folder of a "
                          "training run.")
    metrics = folder / METRICS_FILE
    if not metrics.is_file():
        raise ConfigError(f"{folder}: {METRICS_FILE} not found, so this is not a training run "
                          "folder, or the run stopped before its first report.")

    train, val = read_metrics(metrics)
    saved = read_json(folder / TRAINING_CONFIG_FILE)
    return Run(folder, train, val, config=saved.get("config", {}),
               sources=saved.get("sources", {}), learning_rate=saved.get("learning_rate_used"),
               total_steps=saved.get("total_steps"), summary=read_json(folder / SUMMARY_FILE))


# ---------------------------------------------------------------------------------------------
# The summary written at the start of training.


def split_summary(split) -> dict | None:
    """Return the facts of an EncodedSplit that the report shows."""
    if split is None:
        return None
    summary = split.summary
    return {
        "examples": len(split.examples),
        "examples_read": summary.total,
        "tokens": sum(len(e.tokens) for e in split.examples),
        "target_tokens": sum(e.num_targets for e in split.examples),
        "longest": summary.longest,
        "max_seq_length": summary.max_seq_length,
        "long": len(summary.long),
        "lost_targets": len(summary.lost_targets),
        "dropped": len(summary.dropped),
        "untrainable": len(summary.untrainable),
        "notes": summary.describe(),
    }


def write_run_summary(session, memory_plan_gb: float | None = None) -> None:
    """Write run_summary.json: what the report needs that metrics.jsonl does not hold."""
    from mlxlora.attach import parameter_counts
    from mlxlora.hyperparams import rule_learning_rate

    loaded, config = session.loaded, session.config
    total, trainable = parameter_counts(loaded.model)
    model_type = loaded.config.get("model_type", "")
    hidden_size = loaded.config.get("hidden_size", 0)
    world = session.group.size() if session.group else 1

    rule = rule_learning_rate(model_type, hidden_size).value if hidden_size else None
    content = {
        "model_type": model_type,
        "hidden_size": hidden_size,
        "quantized_base": loaded.quantized,
        "dtype": loaded.dtype,
        "parameters": {"total": total, "trainable": trainable},
        "lora_modules": len(session.spec.target_modules),
        "rule_learning_rate": rule,
        "effective_batch": config.batch_size * config.grad_accumulation_steps,
        "processes": world,
        "batches_per_epoch": session.batches_per_epoch,
        "memory_plan_gb": memory_plan_gb,
        "data": {"train": split_summary(session.train_split),
                 "valid": split_summary(session.valid_split)},
    }
    atomic_write_json(session.run_dir / SUMMARY_FILE, content)


# ---------------------------------------------------------------------------------------------
# Warnings.


def learning_rate_warnings(run: Run) -> list[str]:
    """Return the train-time LR and batch warnings, recomputed from the saved facts."""
    summary = run.summary
    if run.learning_rate is None or not summary.get("hidden_size"):
        return []
    return hyperparameter_warnings(run.learning_rate, summary.get("effective_batch", 0),
                                   summary.get("model_type", ""), summary["hidden_size"])


def overfitting_warning(run: Run) -> str | None:
    best, finite = run.best_val, [r for r in run.val if is_finite(r.get("val_loss"))]
    if best is None or len(finite) < 3:
        return None
    last = finite[-1]
    if last["step"] == best["step"] or last["val_loss"] <= best["val_loss"] * (1 + OVERFIT_MARGIN):
        return None
    return (f"Validation loss rose from {best['val_loss']:.4f} (step {best['step']}) to "
            f"{last['val_loss']:.4f} (step {last['step']}): the adapter is overfitting, learning "
            "the training rows instead of the task. best/ holds the adapter of step "
            f"{best['step']}. Train fewer steps or epochs, add data, or set "
            "--early-stopping-patience.")


def progress_warning(run: Run) -> str | None:
    losses = [r["train_loss"] for r in run.train if is_finite(r.get("train_loss"))]
    if len(losses) < 2 or losses[-1] < losses[0]:
        return None
    return (f"Training loss did not fall (first report {losses[0]:.4f}, last {losses[-1]:.4f}). "
            "The learning rate may be too low or too high; `mlxlora sweep` measures it. Also "
            "check that the completions are what the model should learn (`mlxlora data check`).")


def non_finite_warning(run: Run) -> str | None:
    bad = [r["step"] for r in run.train if not is_finite(r.get("train_loss"))]
    if not bad:
        return None
    return (f"{len(bad)} training reports had no finite loss (steps {', '.join(map(str, bad[:5]))}"
            f"{' ...' if len(bad) > 5 else ''}): their batches were skipped. Lower the learning "
            "rate, or use --dtype float32 if the model trains in float16.")


def token_warnings(run: Run) -> list[str]:
    """Warn about too few tokens in the loss, and about more data than adapter capacity."""
    warnings = []
    trained = run.train[-1].get("trained_tokens") if run.train else None
    if is_finite(trained) and trained < MIN_TRAINED_TOKENS:
        warnings.append(
            f"The loss was computed on only {trained:,} tokens in the whole run. With so little "
            "signal the adapter learns little and the validation loss is noisy: add examples "
            "(a few hundred at least), or longer completions.")

    train_data = (run.summary.get("data") or {}).get("train") or {}
    if train_data.get("untrainable"):
        warnings.append(
            f"{train_data['untrainable']} training examples had no token to train on and were "
            "skipped (empty completions, or prompts longer than max_seq_length).")

    trainable = (run.summary.get("parameters") or {}).get("trainable")
    targets = train_data.get("target_tokens")
    if trainable and targets and targets > trainable:
        warnings.append(
            f"One epoch has {targets:,} target tokens, more than the adapter's {trainable:,} "
            "trainable parameters. LoRA can fall behind full fine-tuning once the data exceeds "
            "its capacity; if the loss flattens early, try a larger --rank.")
    return warnings


def data_warnings(run: Run) -> list[str]:
    data = run.summary.get("data") or {}
    warnings = []
    if run.summary and not data.get("valid"):
        warnings.append("No valid.jsonl: overfitting cannot be seen. Put 5-10% of the examples "
                        "in valid.jsonl next to train.jsonl.")
    train_data = data.get("train") or {}
    if train_data.get("lost_targets"):
        warnings.append(
            f"{train_data['lost_targets']} training examples were cut at max_seq_length "
            f"{train_data['max_seq_length']} and lost completion tokens or their end-of-turn "
            f"token (longest: {train_data['longest']} tokens). Raise --max-seq-length or use "
            "--long-examples drop.")
    return warnings


def memory_warning(run: Run) -> str | None:
    plan = run.summary.get("memory_plan_gb")
    peak = peak_memory(run)
    if not plan or peak is None or peak <= plan * MEMORY_OVER_PLAN:
        return None
    return (f"Peak memory {peak:.2f} GB was {peak / plan:.1f}x the plan's {plan:.2f} GB. "
            "Check batch size and max_seq_length against the plan (`mlxlora plan`).")


def find_warnings(run: Run) -> list[str]:
    """Return every warning about the run's settings, data and curves."""
    warnings = learning_rate_warnings(run)
    for check in (overfitting_warning, progress_warning, non_finite_warning, memory_warning):
        message = check(run)
        if message:
            warnings.append(message)
    return warnings + token_warnings(run) + data_warnings(run)


# ---------------------------------------------------------------------------------------------
# Numbers.


def median_tokens_per_second(run: Run) -> float | None:
    """Median over the reports, leaving out the first, which includes compilation."""
    rates = [r["tokens_per_second"] for r in run.train if is_finite(r.get("tokens_per_second"))]
    if len(rates) > 1:
        rates = rates[1:]
    return statistics.median(rates) if rates else None


def peak_memory(run: Run) -> float | None:
    values = [r["peak_memory_gb"] for r in run.train if is_finite(r.get("peak_memory_gb"))]
    return max(values) if values else None


def scaling(config: dict) -> float | None:
    if not config.get("r") or not config.get("lora_alpha"):
        return None
    r = config["r"] ** 0.5 if config.get("use_rslora") else config["r"]
    return config["lora_alpha"] / r


def learning_rate_curve(run: Run, points: int = 400) -> tuple[list[int], list[float]]:
    """Return (step, learning rate) along the run's schedule, rebuilt from its config."""
    from mlxlora.schedule import build_schedule, default_warmup

    config, total = run.config, run.total_steps
    if run.learning_rate is None or not total or "lr_schedule" not in config:
        return [], []
    warmup = config.get("warmup_steps")
    warmup = default_warmup(total) if warmup is None else warmup
    schedule = build_schedule(run.learning_rate, total, config["lr_schedule"], warmup,
                              config.get("min_lr_ratio", 0.1))

    stride = max(1, total // points)
    indices = sorted(set(range(0, total, stride)) | {total - 1})
    # Optimizer step i (0-based) uses schedule(i) and ends at step i + 1.
    return [i + 1 for i in indices], [float(schedule(i)) for i in indices]


# ---------------------------------------------------------------------------------------------
# The plot.


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


# ---------------------------------------------------------------------------------------------
# The markdown.


def number(value, format_spec: str = ".4f", missing: str = "n/a") -> str:
    return format(value, format_spec) if is_finite(value) else missing


def results_table(run: Run) -> list[str]:
    best = run.best_val
    first_val = run.val[0] if run.val else None
    last_train = run.train[-1] if run.train else None
    rows = [
        ("Steps", f"{run.last_step} of {run.total_steps or '?'}"),
        ("Validation loss before training (step 0)",
         number(first_val["val_loss"]) if first_val and first_val["step"] == 0 else "n/a"),
        ("Best validation loss", f"{number(best['val_loss'])} at step {best['step']} "
                                 "(adapter in best/)" if best else "n/a"),
        ("Last validation loss", number(run.val[-1]["val_loss"]) if run.val else "n/a"),
        ("Last training loss", number(last_train["train_loss"]) if last_train else "n/a"),
        ("Tokens in the loss, whole run",
         f"{last_train['trained_tokens']:,}" if last_train and "trained_tokens" in last_train
         else "n/a"),
    ]
    return table(["Result", "Value"], rows)


def settings_table(run: Run) -> list[str]:
    """Return the settings that decide whether LoRA works, with where each came from."""
    config, summary = run.config, run.summary
    rule = summary.get("rule_learning_rate")
    lr_note = ""
    if rule and run.learning_rate:
        lr_note = f"{run.learning_rate / rule:.2g}x the LoRA rule ({rule:.3g})"
    parameters = summary.get("parameters") or {}
    trainable_note = ""
    if parameters.get("total"):
        base = parameters["total"] - parameters["trainable"]
        trainable_note = f"{100 * parameters['trainable'] / max(base, 1):.3f}% of the base"

    rows = [
        ("learning rate (peak)", number(run.learning_rate, ".3g"), learning_rate_source(run),
         lr_note),
        ("schedule", f"{config.get('lr_schedule', '?')}, warmup "
                     f"{config.get('warmup_steps') if config.get('warmup_steps') is not None else '5% of steps'}",
         source(run, "lr_schedule"), ""),
        ("effective batch", str(summary.get("effective_batch", "?")),
         source(run, "batch_size"),
         f"batch_size {config.get('batch_size', '?')} x grad_accumulation_steps "
         f"{config.get('grad_accumulation_steps', '?')}"),
        ("rank r", str(config.get("r", "?")), source(run, "r"), ""),
        ("lora_alpha", str(config.get("lora_alpha", "?")), source(run, "lora_alpha"),
         f"scaling {number(scaling(config), '.3g')}"),
        ("lora_dropout", str(config.get("lora_dropout", "?")), source(run, "lora_dropout"), ""),
        ("target modules", ", ".join(config.get("target_modules", [])) or "?",
         source(run, "target_modules"), f"{summary.get('lora_modules', '?')} layers adapted"),
        ("trainable parameters", f"{parameters['trainable']:,}" if parameters else "?", "",
         trainable_note),
        ("train on prompt", str(config.get("train_on_prompt", "?")),
         source(run, "train_on_prompt"), PROMPT_NOTES.get(config.get("train_on_prompt"), "")),
    ]
    return table(["Setting", "Value", "Source", "Note"], rows)


PROMPT_NOTES = {
    False: "chat and completions rows: loss on assistant turns only; text rows: every token",
    True: "loss on every token, prompts included",
}


def source(run: Run, name: str) -> str:
    return run.sources.get(name, "")


def learning_rate_source(run: Run) -> str:
    if run.config.get("learning_rate") is not None:
        return source(run, "learning_rate")
    if run.config.get("full_ft_lr") is not None:
        return f"10 x full_ft_lr ({source(run, 'full_ft_lr')})"
    return "LoRA rule for the model size"


def speed_memory_lines(run: Run) -> list[str]:
    lines = []
    rate = median_tokens_per_second(run)
    lines.append(f"- Speed: {number(rate, ',.0f')} tokens in the loss per second (median over "
                 "the reports after the first).")
    peak, plan = peak_memory(run), run.summary.get("memory_plan_gb")
    memory = f"- Peak memory: {number(peak, '.2f')} GB"
    if plan:
        memory += f"; the plan estimated {plan:.2f} GB"
    lines.append(memory + ".")
    if run.summary:
        base = "quantized (QLoRA)" if run.summary.get("quantized_base") else "not quantized"
        lines.append(f"- Base weights: {run.summary.get('dtype', '?')}, {base}. Processes: "
                     f"{run.summary.get('processes', 1)}.")
    return lines


def data_lines(run: Run) -> list[str]:
    data = run.summary.get("data") or {}
    if not data:
        return ["- No data summary (run_summary.json is missing)."]
    lines = []
    for name in ("train", "valid"):
        split = data.get(name)
        if not split:
            lines.append(f"- {name}: none")
            continue
        share = 100 * split["target_tokens"] / max(split["tokens"], 1)
        lines.append(f"- {name}: {split['examples']} examples of {split['examples_read']} read, "
                     f"{split['tokens']:,} tokens, {split['target_tokens']:,} of them in the loss "
                     f"({share:.0f}%); longest {split['longest']} tokens (max_seq_length "
                     f"{split['max_seq_length']}).")
        lines.extend(f"  - {note}" for note in split.get("notes", []))
    return lines


def table(header: list[str], rows: list[tuple]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        cells = [str(cell).replace("|", "\\|") for cell in row]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_report(run: Run, plot_name: str = PLOT_FILE) -> str:
    """Return report.md of one run."""
    config = run.config
    warnings = find_warnings(run)
    lines = [
        f"# Training report: {run.name}",
        "",
        f"Model `{config.get('model', '?')}`, data `{config.get('data', '?')}`.",
        "",
        f"![Loss, learning rate and speed]({plot_name})",
        "",
        *results_table(run),
        "",
        "## Settings that decide whether LoRA works",
        "",
        "Explained in docs/hyperparameters.md. The source column says where each value came "
        "from: default, recipe or flag.",
        "",
        *settings_table(run),
        "",
        "## Speed and memory",
        "",
        *speed_memory_lines(run),
        "",
        "## Data",
        "",
        *data_lines(run),
        "",
        "## Warnings",
        "",
        *([f"- {warning}" for warning in warnings] or ["None."]),
        "",
    ]
    return "\n".join(lines)


def comparison_rows(runs: list[Run]) -> list[tuple]:
    def row(label, value):
        return (label, *[value(run) for run in runs])

    return [
        row("steps", lambda r: str(r.last_step)),
        row("best validation loss", lambda r: f"{number(r.best_val['val_loss'])} (step "
                                              f"{r.best_val['step']})" if r.best_val else "n/a"),
        row("last training loss",
            lambda r: number(r.train[-1]["train_loss"]) if r.train else "n/a"),
        row("learning rate", lambda r: number(r.learning_rate, ".3g")),
        row("effective batch", lambda r: str(r.summary.get("effective_batch", "?"))),
        row("rank r / lora_alpha",
            lambda r: f"{r.config.get('r', '?')} / {r.config.get('lora_alpha', '?')}"),
        row("target modules", lambda r: ", ".join(r.config.get("target_modules", [])) or "?"),
        row("trainable parameters",
            lambda r: f"{(r.summary.get('parameters') or {}).get('trainable', 0):,}"),
        row("tokens/s (median)", lambda r: number(median_tokens_per_second(r), ",.0f")),
        row("peak memory (GB)", lambda r: number(peak_memory(r), ".2f")),
    ]


def changed_settings(runs: list[Run]) -> list[str]:
    """Return the config fields whose values differ between the runs."""
    ignored = {"adapter_path", "resume", "overwrite"}
    names = sorted(set().union(*(run.config for run in runs)) - ignored)
    return [name for name in names if len({json.dumps(run.config.get(name)) for run in runs}) > 1]


def render_comparison(runs: list[Run], plot_name: str) -> str:
    """Return a markdown page that sets several runs side by side."""
    changed = changed_settings(runs)
    lines = [
        "# Run comparison: " + " vs ".join(run.name for run in runs),
        "",
        f"![Loss, learning rate and speed]({plot_name})",
        "",
        *table(["", *[f"{run.name} ({run.folder})" for run in runs]], comparison_rows(runs)),
        "",
        "Settings that differ: " + (", ".join(f"`{name}`" for name in changed) or "none") + ".",
        "",
    ]
    for run in runs:
        warnings = find_warnings(run)
        lines += [f"## Warnings for {run.name}", "",
                  *([f"- {w}" for w in warnings] or ["None."]), ""]
    return "\n".join(lines)


def write_report(folder, compare=(), output=None) -> tuple[Path, Path]:
    """Write report.md and loss.png for a run, or a comparison with other runs.

    Without ``compare`` the files go into the run folder. With it, compare.md and compare.png
    go into ``output`` (default: the first run's folder), so the run's own report stays.
    Returns the paths of the markdown file and of the plot.
    """
    run = load_run(folder)
    others = [load_run(other) for other in compare]
    target = Path(output) if output else run.folder
    target.mkdir(parents=True, exist_ok=True)

    if not others:
        markdown, plot = target / REPORT_FILE, target / PLOT_FILE
        plot_runs([run], plot)
        atomic_write_text(markdown, render_report(run, plot.name))
        return markdown, plot

    markdown, plot = target / COMPARE_REPORT_FILE, target / COMPARE_PLOT_FILE
    runs = [run, *others]
    plot_runs(runs, plot)
    atomic_write_text(markdown, render_comparison(runs, plot.name))
    return markdown, plot


def write_report_after_training(folder) -> None:
    """Write report.md and loss.png at the end of training, logging instead of raising.

    The adapter is already saved when this runs, so a failed plot must not turn a finished
    run into a failed one; `mlxlora report DIR` retries.
    """
    try:
        markdown, plot = write_report(folder)
    except Exception as error:  # any plotting or file error; see the docstring
        logger.warning("report not written (%s). Run `mlxlora report %s` to retry.", error, folder)
        return
    logger.info("report written: %s and %s", markdown, plot)
