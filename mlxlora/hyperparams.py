"""The default LoRA learning rate, and warnings for settings that usually hurt LoRA.

LoRA needs roughly 10x the learning rate of full fine-tuning on the same model ("LoRA
Without Regret", Schulman and Thinking Machines Lab, 2025). For how the rate scales with
model size we use the fit published in Thinking Machines' tinker-cookbook
(``tinker_cookbook/hyperparam_utils.py``, ``get_lr``, formula version of 2025):

    lr = 5e-5 * 10 * (2000 / hidden_size) ** p,  p = 0.781 for Llama, 0.0775 for Qwen

fitted on supervised fine-tuning sweeps of those two families. Other families get the
Llama exponent, which the log says. The cookbook later replaced the formula by a per-model
table from a larger sweep. Both are starting points: ``mlxlora sweep`` measures the
optimum for the user's own model and data.
"""

from dataclasses import dataclass

FULL_FT_BASE_LR = 5e-5
LORA_MULTIPLIER = 10.0
REFERENCE_HIDDEN_SIZE = 2000
EXPONENTS = {"llama": 0.781, "qwen": 0.0775}

# A rate this far below the rule looks copied from full fine-tuning.
LOW_LR_FACTOR = 4.0
# Effective batches above this many examples trained clearly worse with LoRA than with full
# fine-tuning in "LoRA Without Regret"; a larger rank did not close the gap.
LARGE_BATCH = 64


@dataclass
class LearningRateChoice:
    value: float
    reason: str


def model_family(model_type: str) -> str | None:
    model_type = (model_type or "").lower()
    for family in EXPONENTS:
        if model_type.startswith(family):
            return family
    return None


def rule_learning_rate(model_type: str, hidden_size: int) -> LearningRateChoice:
    """Return the LoRA learning rate the size rule gives for this model."""
    family = model_family(model_type)
    exponent = EXPONENTS[family or "llama"]
    lr = FULL_FT_BASE_LR * LORA_MULTIPLIER * (REFERENCE_HIDDEN_SIZE / hidden_size) ** exponent

    note = "" if family else f"; no fitted exponent for model_type {model_type!r}, used Llama's"
    reason = (f"LoRA rule for hidden_size {hidden_size}: 5e-5 * 10 * (2000 / {hidden_size})"
              f"^{exponent} = {lr:.3g}{note}")
    return LearningRateChoice(round(lr, 8), reason)


def choose_learning_rate(learning_rate: float | None, full_ft_lr: float | None,
                         model_type: str, hidden_size: int) -> LearningRateChoice:
    """Resolve the peak learning rate from the flags, or from the rule when none is given."""
    if learning_rate is not None:
        return LearningRateChoice(learning_rate, "set by the user")
    if full_ft_lr is not None:
        value = LORA_MULTIPLIER * full_ft_lr
        return LearningRateChoice(
            value, f"10 x full_ft_lr {full_ft_lr:g} = {value:.3g}: LoRA needs about 10x the "
                   "full fine-tuning learning rate")
    return rule_learning_rate(model_type, hidden_size)


def hyperparameter_warnings(learning_rate: float, effective_batch: int, model_type: str,
                            hidden_size: int) -> list[str]:
    """Return warnings for a learning rate or batch size that usually hurts LoRA."""
    warnings = []
    rule = rule_learning_rate(model_type, hidden_size).value

    if learning_rate < rule / LOW_LR_FACTOR:
        warnings.append(
            f"learning_rate {learning_rate:.3g} is {rule / learning_rate:.0f}x below the LoRA "
            f"rule ({rule:.3g}). It looks like a full fine-tuning rate; LoRA usually needs about "
            "10x more. Run `mlxlora sweep` to measure, or pass --full-ft-lr to convert.")

    if effective_batch > LARGE_BATCH:
        warnings.append(
            f"effective batch size {effective_batch} (batch_size x grad_accumulation_steps) is "
            f"above {LARGE_BATCH}. Large batches hurt LoRA more than full fine-tuning, and a "
            "larger rank does not fix it. Run `mlxlora sweep --batch-sizes` to compare.")
    return warnings
