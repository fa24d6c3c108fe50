"""Warnings about a finished run: settings, curves, data and memory that usually go wrong."""

from mlxlora.hyperparams import hyperparameter_warnings
from mlxlora.run_facts import Run, effective_batch, is_finite, peak_memory

# A validation loss this much above its best, at the last evaluation, reads as overfitting
# rather than noise between evaluations.
OVERFIT_MARGIN = 0.02
# NOTE: a rough floor, not a measured one. Below it the loss was computed on so few tokens
# that the adapter has little to learn from and the validation loss is noisy.
MIN_TRAINED_TOKENS = 10_000
# Peak memory this far above the plan deserves a look at the plan's assumptions.
MEMORY_OVER_PLAN = 1.25


def learning_rate_warnings(run: Run) -> list[str]:
    """Return the train-time LR and batch warnings, recomputed from the saved facts."""
    summary = run.summary
    if run.learning_rate is None or not summary.get("hidden_size"):
        return []
    return hyperparameter_warnings(run.learning_rate, effective_batch(run) or 0,
                                   summary.get("model_type", ""), summary["hidden_size"])


def validation_warning(run: Run) -> str | None:
    """Warn when the last validation loss is clearly above the best one.

    A best loss at step 0, the evaluation before training, means training never helped,
    which points at the learning rate; a later best means overfitting.
    """
    best, finite = run.best_val, [r for r in run.val if is_finite(r.get("val_loss"))]
    if best is None or len(finite) < 2:
        return None
    last = finite[-1]
    if last["step"] == best["step"] or last["val_loss"] <= best["val_loss"] * (1 + OVERFIT_MARGIN):
        return None

    if best["step"] == 0:
        return (f"Validation loss never fell below its value before training "
                f"({best['val_loss']:.4f}) and ended at {last['val_loss']:.4f} (step "
                f"{last['step']}): the learning rate is probably too high. Try 3-10x lower, or "
                "measure it with `mlxlora sweep`.")
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


def stopped_early(run: Run) -> bool:
    """Return whether early stopping explains a run that ended before its last step."""
    patience = run.config.get("early_stopping_patience")
    best = run.best_val
    if not patience or best is None:
        return False
    later = [r for r in run.val if r["step"] > best["step"]]
    return len(later) >= patience


def unfinished_warning(run: Run) -> str | None:
    """Warn when the records end before the run's planned last step."""
    if not run.total_steps or run.last_step >= run.total_steps or stopped_early(run):
        return None
    return (f"The run ended at step {run.last_step} of {run.total_steps}: it was stopped "
            "(Ctrl-C, SIGTERM, a crash or a non-finite loss) before its last step, so this "
            "report covers part of it. Continue from its newest checkpoint with "
            f"`mlxlora train --resume {run.folder}`.")


def find_warnings(run: Run) -> list[str]:
    """Return every warning about the run's settings, data and curves."""
    warnings = learning_rate_warnings(run)
    for check in (unfinished_warning, validation_warning, progress_warning, non_finite_warning,
                  memory_warning):
        message = check(run)
        if message:
            warnings.append(message)
    return warnings + token_warnings(run) + data_warnings(run)
