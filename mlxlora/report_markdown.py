"""report.md of one run, and compare.md of several runs side by side."""

import json

from mlxlora.report_checks import find_warnings
from mlxlora.run_facts import (Run, effective_batch, is_finite, median_tokens_per_second,
                               peak_memory, scaling)

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

    warmup = config.get("warmup_steps")
    warmup_text = "5% of steps" if warmup is None else f"{warmup} steps"

    rows = [
        ("learning rate (peak)", number(run.learning_rate, ".3g"), learning_rate_source(run),
         lr_note),
        ("schedule", f"{config.get('lr_schedule', '?')}, warmup {warmup_text}",
         source(run, "lr_schedule"), ""),
        ("effective batch", str(effective_batch(run) or "?"),
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
        lines.append(f"- Base weights: {base_weights_text(run.summary)}. Processes: "
                     f"{run.summary.get('processes', 1)}.")
    return lines


def base_weights_text(summary: dict) -> str:
    """Describe the base weights: quantized (QLoRA), dequantized from a quantized file, or float."""
    dtype = summary.get("dtype", "?")
    if summary.get("quantized_base"):
        return f"quantized (QLoRA), computed in {dtype}"
    if summary.get("dequantized_base"):
        return f"{dtype}, dequantized from the quantized model files"
    return f"{dtype}, not quantized"


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
    return lines + data_check_lines(run.summary.get("data_check_warnings"))


def data_check_lines(warnings: list[str] | None) -> list[str]:
    if warnings is None:
        return ["- Data check: skipped (--skip-data-check)."]
    if not warnings:
        return ["- Data check: no warnings."]
    noun = "warning" if len(warnings) == 1 else "warnings"
    lines = [f"- Data check: {len(warnings)} {noun} (`mlxlora data check` shows the rows):"]
    return lines + [f"  - {warning}" for warning in warnings]


def table(header: list[str], rows: list[tuple]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        cells = [str(cell).replace("|", "\\|") for cell in row]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_report(run: Run, plot_name: str) -> str:
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
        row("effective batch", lambda r: str(effective_batch(r) or "?")),
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
