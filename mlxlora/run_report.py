"""The report of a training run: report.md and loss.png in the run folder.

Training writes run_summary.json before its first step and the report after its last. The
report reads only files of the run folder (see mlxlora.run_facts), so `mlxlora report DIR`
can rebuild it at any time, also for a run that was stopped.
"""

import logging
from pathlib import Path

from mlxlora.errors import ConfigError
from mlxlora.files import atomic_write_json, atomic_write_text
from mlxlora.report_markdown import render_comparison, render_report
from mlxlora.report_plot import plot_runs
from mlxlora.run_facts import SUMMARY_FILE, load_run

logger = logging.getLogger("mlxlora")

REPORT_FILE = "report.md"
PLOT_FILE = "loss.png"
COMPARE_REPORT_FILE = "compare.md"
COMPARE_PLOT_FILE = "compare.png"


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


def data_check_warnings(config) -> list[str] | None:
    """Return the warnings of the data check that train ran, or None when it was skipped.

    The check runs again without a tokenizer, which takes a re-read of the files: the
    token-length findings it leaves out are in the split summaries instead.
    """
    if config.skip_data_check:
        return None
    from mlxlora.data_check import check_data

    report = check_data(config.data, config, split_names=("train", "valid"))
    return [f"{finding.split}: {finding.message}" if finding.split else finding.message
            for finding in report.warnings]


def write_run_summary(session) -> None:
    """Write run_summary.json: what the report needs that metrics.jsonl does not hold."""
    from mlxlora.attach import parameter_counts
    from mlxlora.hyperparams import rule_learning_rate

    loaded, config = session.loaded, session.config
    plan = session.memory_plan
    total, trainable = parameter_counts(loaded.model)
    model_type = loaded.config.get("model_type", "")
    hidden_size = loaded.config.get("hidden_size", 0)
    world = session.group.size() if session.group else 1

    rule = rule_learning_rate(model_type, hidden_size).value if hidden_size else None
    content = {
        "model_type": model_type,
        "hidden_size": hidden_size,
        "quantized_base": loaded.quantized,
        "dequantized_base": loaded.dequantized,
        "dtype": loaded.dtype,
        "parameters": {"total": total, "trainable": trainable},
        "lora_modules": len(session.spec.target_modules),
        "rule_learning_rate": rule,
        "effective_batch": config.batch_size * config.grad_accumulation_steps,
        "processes": world,
        "batches_per_epoch": session.batches_per_epoch,
        "memory_plan_gb": plan.estimate.total / 1e9 if plan is not None else None,
        "data": {"train": split_summary(session.train_split),
                 "valid": split_summary(session.valid_split)},
        "data_check_warnings": data_check_warnings(config),
    }
    atomic_write_json(session.run_dir / SUMMARY_FILE, content)


def write_report(folder, compare=(), output=None) -> tuple[Path, Path]:
    """Write report.md and loss.png for a run, or a comparison with other runs.

    Without ``compare`` the files go into the run folder. With it, compare.md and compare.png
    go into ``output`` (default: the first run's folder), so the run's own report stays.
    Returns the paths of the markdown file and of the plot.
    """
    run = load_run(folder)
    others = [load_run(other) for other in compare]
    target = Path(output) if output else run.folder
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"--output {target}: cannot create it ({error.strerror}). Choose a "
                          "folder you can write to.") from None

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
