"""Explain a NaN or inf loss or gradient: the step, the batch's source lines, likely causes."""

import math

from mlxlora.hyperparams import rule_learning_rate

# A peak rate this many times the LoRA size rule is a likely cause of divergence.
HIGH_LR_FACTOR = 3.0
LISTED_SOURCES = 8


def likely_causes(session, step: int, loss: float, grad_norm: float) -> list[str]:
    """Return the likely causes of a non-finite step, most likely first."""
    causes = []
    lr = float(session.schedule(step))
    model_config = session.loaded.config
    rule = rule_learning_rate(model_config.get("model_type", ""),
                              model_config.get("hidden_size", 0) or 2000).value
    if session.learning_rate > HIGH_LR_FACTOR * rule:
        causes.append(f"learning rate too high: peak {session.learning_rate:.3g} is "
                      f"{session.learning_rate / rule:.0f}x the LoRA rule's {rule:.3g} "
                      "(try --learning-rate 3-10x lower)")
    if session.loaded.dtype in ("float16", "bfloat16"):
        causes.append(f"{session.loaded.dtype} overflow in the model's activations "
                      "(try --dtype float32)")
    if math.isfinite(loss) and not math.isfinite(grad_norm):
        causes.append("the loss is finite but the gradient is not: an overflow in the backward "
                      "pass (lower --learning-rate or --max-grad-norm, or use --dtype float32)")
    if not causes:
        causes.append(f"learning rate {lr:.3g} at this step too high for this data (try "
                      "--learning-rate 3-10x lower, or `mlxlora sweep`)")
    causes.append("a bad example in the batch: check the lines listed")
    return causes


def describe_non_finite(session, step: int, loss: float, grad_norm: float,
                        sources: list[str]) -> str:
    """Return the message for a non-finite step ``step`` (0-based) over rows ``sources``."""
    shown = ", ".join(sources[:LISTED_SOURCES])
    if len(sources) > LISTED_SOURCES:
        shown += f" and {len(sources) - LISTED_SOURCES} more"
    causes = likely_causes(session, step, loss, grad_norm)
    return (f"step {step + 1}: the loss is {loss} and the gradient norm {grad_norm}; batch rows: "
            f"{shown}. Likely causes: " + "; ".join(causes))
