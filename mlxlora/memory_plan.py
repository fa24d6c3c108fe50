"""Estimate the memory of a LoRA, QLoRA or full fine-tuning step before training starts.

The estimate adds up the base weights, the trainable weights, their gradients, the AdamW
moments, the activations that the backward pass keeps, and the logits buffer of the
cross-entropy loss. Weights and parameter counts come from the model's real shapes. The
activation terms follow what mlx-lm's llama-style blocks keep, calibrated against
mx.get_peak_memory; docs/memory.md lists the measurements and the remaining error.
"""

import json
import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxlora.attach import BLOCK_PATTERN
from mlxlora.batching import batch_indices
from mlxlora.loading import on_gpu
from mlxlora.lora import LoRALinear

logger = logging.getLogger("mlxlora")

METHODS = ("lora", "qlora", "full")
METHOD_TITLES = {"lora": "LoRA", "qlora": "QLoRA", "full": "full FT"}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}

# LoRA matrices and their AdamW moments are float32 whatever the base dtype (see lora.py).
LORA_BYTES = 4
ADAM_MOMENTS = 2

# Calibration constants, fitted to peaks measured by benchmarks/plan_accuracy.py on the
# CPU backend of mlx 0.32.4 (SmolLM2-135M, stories260K and the tiny test llama):
# - the loss needs about 3.4 float32 (target tokens x vocabulary) buffers at once, because
#   the training step projects only the positions that have a target;
# - the backward pass of one block needs extra working memory of about 2.8 times that
#   block's kept per-token values plus 1.8 times its attention scores.
# NOTE: Metal was not measured. Its fused attention kernels may keep less than this model.
LOGITS_COPIES = 3.4
BACKWARD_LINEAR_FACTOR = 2.8
BACKWARD_SCORES_FACTOR = 1.8

# On a CPU, each quantized product of a QLoRA step multiplies by a float copy of its weight
# (mlxlora.dequantized_matmul), and mx.dequantize (mlx 0.32.4, CPU) peaks at twice the size
# of its output. For SmolLM2-135M with its 49k x 576 tied head, this is 226 MB.
DEQUANTIZE_COPIES = 2

# mlx_lm.convert's default when a float model is quantized with -q.
DEFAULT_QUANTIZATION = {"bits": 4, "group_size": 64}

# Linear layers whose input is not shared with a sibling layer. The other linear layers
# of one parent (q/k/v, gate/up) read the same input, which the backward keeps once.
OUTPUT_PROJECTIONS = {"o_proj", "out_proj", "down_proj", "dense", "wo", "w2", "c_proj",
                      "dense_4h_to_h"}

# collate() pads every batch to a multiple of this many tokens.
PAD_MULTIPLE = 32
# The loss pads the number of target positions of a micro-batch to a multiple of this.
TARGET_ROW_MULTIPLE = 64


@dataclass
class Matrix:
    """A weight matrix of the base model, with its shape before any quantization."""

    path: str
    block: int | None
    out_features: int
    in_features: int
    bits: int | None = None
    group_size: int | None = None


@dataclass
class ModelLayout:
    """The shapes and dimensions of a base model that the estimate needs."""

    matrices: list[Matrix]
    other_parameters: int
    loaded_bytes: int
    loaded_quantized: bool
    compute_bytes: int
    num_blocks: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    attention_width: int
    kv_width: int
    vocab_size: int

    @property
    def base_parameters(self) -> int:
        return sum(m.out_features * m.in_features for m in self.matrices) + self.other_parameters


@dataclass
class PlanSettings:
    """The training options that change memory use."""

    batch_size: int
    sequence_length: int
    r: int
    targets: list[str]
    grad_checkpoint: bool = False
    lora_dropout: float = 0.0
    grad_accumulation_steps: int = 1
    # Most target tokens in one micro-batch; None counts every position (text data).
    target_tokens: int | None = None

    def with_batch_size(self, batch_size: int) -> "PlanSettings":
        """Return these settings for another micro-batch size, target tokens scaled along."""
        targets = self.target_tokens
        if targets is not None:
            targets = -(-targets * batch_size // self.batch_size)
        return replace(self, batch_size=batch_size, target_tokens=targets)


@dataclass
class MemoryEstimate:
    """Estimated bytes of one training method, component by component."""

    method: str
    trainable_parameters: int
    base_weights: int
    lora_weights: int
    gradients: int
    optimizer_state: int
    activations: int
    logits: int
    # Float copies that quantized products make on a CPU (mlxlora.dequantized_matmul).
    dequantized_copies: int = 0

    @property
    def total(self) -> int:
        return (self.base_weights + self.lora_weights + self.gradients + self.optimizer_state
                + self.activations + self.logits + self.dequantized_copies)


@dataclass
class MemoryPlan:
    """Estimates for LoRA, QLoRA and full fine-tuning, and how they compare with the limit."""

    total_parameters: int
    selected: str
    settings: PlanSettings
    estimates: dict[str, MemoryEstimate]
    limit: int
    limit_source: str
    suggestions: list[str] = field(default_factory=list)

    @property
    def estimate(self) -> MemoryEstimate:
        return self.estimates[self.selected]

    def fits(self, method: str | None = None) -> bool:
        return self.estimates[method or self.selected].total <= self.limit

    def to_dict(self) -> dict:
        estimates = {name: {**asdict(e), "total": e.total} for name, e in self.estimates.items()}
        return {"total_parameters": self.total_parameters, "selected": self.selected,
                "settings": asdict(self.settings), "estimates": estimates,
                "limit_bytes": self.limit, "limit_source": self.limit_source,
                "fits": self.fits(), "suggestions": self.suggestions}


def _module_block(path: str) -> int | None:
    match = BLOCK_PATTERN.search(path)
    return int(match.group(1)) if match else None


def _matrix(path: str, module: nn.Module) -> Matrix | None:
    block = _module_block(path)
    if isinstance(module, nn.QuantizedLinear):
        out_features, packed = module.weight.shape
        return Matrix(path, block, out_features, packed * 32 // module.bits, module.bits,
                      module.group_size)
    if isinstance(module, nn.QuantizedEmbedding):
        rows, packed = module.weight.shape
        return Matrix(path, block, rows, packed * 32 // module.bits, module.bits,
                      module.group_size)
    if isinstance(module, (nn.Linear, nn.Embedding)):
        rows, columns = module.weight.shape
        return Matrix(path, block, rows, columns)
    return None


def describe_model(model: nn.Module, config: dict) -> ModelLayout:
    """Collect the weight matrices and dimensions of ``model``, with or without LoRA attached.

    ``config`` is the model's HF-style config dict. Arrays are never evaluated, so a lazily
    loaded model costs no memory here.
    """
    matrices, matrix_values = [], set()
    for path, module in model.named_modules():
        if isinstance(module, LoRALinear):
            continue
        matrix = _matrix(path, module)
        if matrix is None:
            continue
        # A LoRALinear's base layer lives at "<path>.base"; the adapter names the outer path.
        matrix.path = path.removesuffix(".base")
        matrices.append(matrix)
        matrix_values.add(path + ".weight")
        if matrix.bits:
            matrix_values.update({path + ".scales", path + ".biases"})

    other, loaded_bytes, float_sizes = 0, 0, Counter()
    for path, value in tree_flatten(model.parameters()):
        if path.endswith((".lora_A", ".lora_B")):
            continue
        loaded_bytes += value.nbytes
        if mx.issubdtype(value.dtype, mx.floating):
            float_sizes[str(value.dtype).rpartition(".")[2]] += value.size
        if path not in matrix_values:
            other += value.size
    compute_dtype = float_sizes.most_common(1)[0][0] if float_sizes else "float32"

    hidden = config.get("hidden_size") or max(m.in_features for m in matrices)
    heads = config.get("num_attention_heads") or 1
    head_dim = config.get("head_dim") or hidden // heads
    kv_heads = config.get("num_key_value_heads") or heads
    block_rows = [m.out_features for m in matrices if m.block == 0]
    return ModelLayout(
        matrices=matrices, other_parameters=other, loaded_bytes=loaded_bytes,
        loaded_quantized=any(m.bits for m in matrices),
        compute_bytes=DTYPE_BYTES.get(compute_dtype, 4),
        num_blocks=len(getattr(model, "layers", [])),
        hidden_size=hidden,
        intermediate_size=config.get("intermediate_size") or max(block_rows, default=hidden),
        num_heads=heads, attention_width=heads * head_dim, kv_width=kv_heads * head_dim,
        vocab_size=config.get("vocab_size") or max(m.out_features for m in matrices))


def batch_width(longest_example: int, max_seq_length: int) -> int:
    """Return the padded input width of the widest batch, as collate() builds it.

    Inputs are the tokens minus the last one, padded up to a multiple of 32.
    """
    tokens = min(longest_example, max_seq_length) - 1
    return max(PAD_MULTIPLE, -(-tokens // PAD_MULTIPLE) * PAD_MULTIPLE)


def _quantized_bytes(matrix: Matrix, quantization: dict, scale_bytes: int) -> int:
    """Return the bytes of one matrix stored in MLX's affine quantization."""
    # A per-module entry (mlx-lm's format, also read from GGUF files) overrides the common one.
    settings = quantization.get(matrix.path)
    settings = settings if isinstance(settings, dict) else quantization
    bits = matrix.bits or settings["bits"]
    group = matrix.group_size or settings["group_size"]
    if not matrix.bits and matrix.in_features % group:
        # mlx-lm leaves a matrix whose rows do not split into whole groups unquantized.
        return matrix.out_features * matrix.in_features * scale_bytes
    packed = matrix.out_features * matrix.in_features * bits // 8
    return packed + 2 * matrix.out_features * (matrix.in_features // group) * scale_bytes


def base_bytes(layout: ModelLayout, method: str, quantization: dict | None = None) -> int:
    """Return the bytes of the frozen (or, for full fine-tuning, trained) base weights."""
    float_bytes = layout.base_parameters * layout.compute_bytes
    if method == "qlora":
        if layout.loaded_quantized:
            return layout.loaded_bytes
        quantization = quantization or DEFAULT_QUANTIZATION
        matrices = sum(_quantized_bytes(m, quantization, layout.compute_bytes)
                       for m in layout.matrices)
        return matrices + layout.other_parameters * layout.compute_bytes
    return layout.loaded_bytes if not layout.loaded_quantized else float_bytes


def dequantize_bytes(layout: ModelLayout) -> int:
    """Return the working memory of dequantizing the largest matrix for one product on a CPU."""
    if on_gpu():
        return 0
    largest = max((m.out_features * m.in_features for m in layout.matrices), default=0)
    return DEQUANTIZE_COPIES * largest * layout.compute_bytes


def lora_parameters(layout: ModelLayout, targets: list[str], r: int) -> int:
    """Return the number of LoRA parameters: r * (in + out) for each adapted matrix."""
    by_path = {m.path: m for m in layout.matrices}
    return sum(r * (by_path[p].in_features + by_path[p].out_features) for p in targets)


def _kept_per_token(layout: ModelLayout, adapted: list[Matrix], r: int, dropout: bool) -> int:
    """Return the values per token that one block keeps for the backward pass.

    Every block in the gradient path keeps the inputs of its two norms (2 * hidden), the
    attention's q, k and v, and three MLP tensors: gate, up and one more that the lean
    SwiGLU (mlxlora.lean_mlp) leaves, where mlx-lm's own activation keeps two.
    Each distinct input of an adapted linear layer is kept for the LoRA A gradient, and
    each adapter's r-wide product for the B gradient. LoRA dropout keeps one more copy of
    every adapted layer's input.
    """
    values = (2 * layout.hidden_size + layout.attention_width + 2 * layout.kv_width
              + 3 * layout.intermediate_size)

    inputs = {}
    for matrix in adapted:
        parent, _, name = matrix.path.rpartition(".")
        key = matrix.path if name in OUTPUT_PROJECTIONS else (parent, matrix.in_features)
        inputs[key] = matrix.in_features
    values += sum(inputs.values()) + r * len(adapted)
    if dropout:
        values += sum(matrix.in_features for matrix in adapted)
    return values


def activation_bytes(layout: ModelLayout, settings: PlanSettings, method: str) -> tuple[int, int]:
    """Return (activation bytes, logits bytes) of the largest training micro-batch.

    Blocks from the first adapted one to the last are in the gradient path and keep their
    activations (only their inputs with gradient checkpointing). During the backward pass
    the working memory of one block and the logits buffer are not needed at once, so only
    the larger of the two is counted.
    """
    batch, length = settings.batch_size, settings.sequence_length
    tokens = batch * length
    size = layout.compute_bytes
    rows = -(-(settings.target_tokens or tokens) // TARGET_ROW_MULTIPLE) * TARGET_ROW_MULTIPLE
    logits = int(LOGITS_COPIES * max(rows, TARGET_ROW_MULTIPLE) * layout.vocab_size * 4)

    if method == "full":
        adapted = [m for m in layout.matrices if m.block is not None]
        r, dropout = 0, False
    else:
        adapted = [m for m in layout.matrices if m.path in set(settings.targets)]
        r, dropout = settings.r, settings.lora_dropout > 0

    blocks = sorted({m.block for m in adapted if m.block is not None})
    if not blocks:
        return 0, logits
    path_blocks = range(blocks[0], layout.num_blocks)

    scores = batch * layout.num_heads * length * length * size
    per_block = [tokens * size * _kept_per_token(
        layout, [m for m in adapted if m.block == b], r, dropout) for b in path_blocks]
    working = BACKWARD_LINEAR_FACTOR * max(per_block) + BACKWARD_SCORES_FACTOR * scores

    if settings.grad_checkpoint:
        kept = len(per_block) * tokens * layout.hidden_size * size
        working += max(per_block) + scores
    else:
        kept = sum(per_block) + len(per_block) * scores
    return int(kept + max(0, working - logits)), logits


def estimate_method(layout: ModelLayout, settings: PlanSettings, method: str,
                    quantization: dict | None = None) -> MemoryEstimate:
    """Return the memory estimate of one method: "lora", "qlora" or "full"."""
    activations, logits = activation_bytes(layout, settings, method)
    if method == "full":
        trainable = layout.base_parameters
        trained_bytes = trainable * layout.compute_bytes
        return MemoryEstimate(method, trainable, base_bytes(layout, "full"), 0, trained_bytes,
                              ADAM_MOMENTS * trained_bytes, activations, logits)

    trainable = lora_parameters(layout, settings.targets, settings.r)
    lora = trainable * LORA_BYTES
    copies = dequantize_bytes(layout) if method == "qlora" else 0
    return MemoryEstimate(method, trainable, base_bytes(layout, method, quantization), lora,
                          lora, ADAM_MOMENTS * lora, activations, logits, copies)


def memory_limit() -> tuple[int, str]:
    """Return the memory a training run may use and where the number comes from.

    On a Mac GPU this is Metal's recommended working-set size, which is less than the RAM;
    elsewhere it is the physical RAM.
    """
    if mx.metal.is_available():
        # mlx 0.32 has mx.device_info; older versions have only mx.metal.device_info.
        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
        size = info.get("max_recommended_working_set_size")
        if size:
            return int(size), "Metal working-set limit"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "RAM"


def plan_memory(layout: ModelLayout, settings: PlanSettings, selected: str,
                quantization: dict | None = None,
                limit: tuple[int, str] | None = None) -> MemoryPlan:
    """Estimate all three methods, mark the one this run uses, and suggest changes that fit."""
    limit_bytes, limit_source = limit or memory_limit()
    estimates = {m: estimate_method(layout, settings, m, quantization) for m in METHODS}
    plan = MemoryPlan(layout.base_parameters + estimates["lora"].trainable_parameters,
                      selected, settings, estimates, limit_bytes, limit_source)
    if not plan.fits():
        plan.suggestions = suggest_changes(layout, plan, quantization)
    return plan


def suggest_changes(layout: ModelLayout, plan: MemoryPlan, quantization: dict | None) -> list[str]:
    """Return the single changes that bring the selected run under the limit, mildest first."""
    settings, method = plan.settings, plan.selected

    def fits(changed: PlanSettings, changed_method: str = method) -> bool:
        return estimate_method(layout, changed, changed_method, quantization).total <= plan.limit

    suggestions = []

    if not settings.grad_checkpoint and fits(replace(settings, grad_checkpoint=True)):
        suggestions.append("--grad-checkpoint (recomputes block activations, ~30% slower)")

    batch = settings.batch_size // 2
    while batch >= 1:
        steps = settings.grad_accumulation_steps * settings.batch_size // batch
        if fits(settings.with_batch_size(batch)):
            suggestions.append(f"--batch-size {batch} --grad-accumulation-steps {steps} "
                               f"(the same effective batch)")
            break
        batch //= 2

    if method == "lora" and fits(settings, "qlora"):
        how = ("--no-dequantize (keeps the quantized base)" if quantization
               else "a 4-bit copy of the model (mlx_lm.convert -q), trained with --no-dequantize")
        suggestions.append(f"QLoRA: {how}")

    blocks = sorted({m.block for m in layout.matrices
                     if m.path in set(settings.targets) and m.block is not None})
    count = len(blocks) // 2
    while count >= 1:
        first = layout.num_blocks - count
        kept = [p for p in settings.targets if (_module_block(p) or first) >= first]
        if fits(replace(settings, targets=kept)):
            suggestions.append(f"--layers {count} (adapt only the last {count} blocks)")
            break
        count //= 2

    if not suggestions:
        suggestions.append("no single change of checkpointing, batch size, QLoRA or layers "
                           "fits: combine them, use a shorter --max-seq-length, or pick a "
                           "smaller model")
    return suggestions


def source_quantization(model_path: Path) -> dict | None:
    """Return the quantization entry of the model's files (common bits and group size, plus
    per-module entries), or None for float files."""
    model_path = Path(model_path)
    if model_path.is_file():
        from mlxlora.gguf import read_gguf_config

        quantization = read_gguf_config(model_path).get("quantization")
    else:
        config_file = model_path / "config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        quantization = config.get("quantization") or config.get("quantization_config")
    if not isinstance(quantization, dict) or "bits" not in quantization:
        return None
    return {"group_size": 64, **quantization}


def format_bytes(count: float) -> str:
    if count >= 1e9:
        return f"{count / 1e9:.2f} GB"
    return f"{count / 1e6:.1f} MB"


def _format_count(count: int) -> str:
    if count >= 1e9:
        return f"{count / 1e9:.2f} B"
    if count >= 1e6:
        return f"{count / 1e6:.2f} M"
    return f"{count:,}"


# Rows whose zero means "not part of this method", shown as "-".
OPTIONAL_ROWS = ("lora_weights", "dequantized_copies")

ROWS = (
    ("trained parameters", "trainable_parameters", _format_count),
    ("base weights", "base_weights", format_bytes),
    ("LoRA weights", "lora_weights", format_bytes),
    ("gradients", "gradients", format_bytes),
    ("AdamW state", "optimizer_state", format_bytes),
    ("activations", "activations", format_bytes),
    ("logits and loss", "logits", format_bytes),
    ("dequantized copies", "dequantized_copies", format_bytes),
    ("total", "total", format_bytes),
)


def describe_plan(plan: MemoryPlan) -> list[str]:
    """Return the plan as text lines: a header, a table of the three methods, the verdict."""
    s = plan.settings
    lines = [f"memory estimate for batch {s.batch_size} x {s.sequence_length} tokens, r={s.r}, "
             f"{len(s.targets)} LoRA modules, gradient checkpointing "
             f"{'on' if s.grad_checkpoint else 'off'}; {_format_count(plan.total_parameters)} "
             f"parameters in all"]

    titles = [METHOD_TITLES[m] + (" *" if m == plan.selected else "") for m in METHODS]
    lines.append(f"  {'':<20}" + "".join(f"{t:>13}" for t in titles))
    for label, name, formatter in ROWS:
        values = [getattr(plan.estimates[m], name) for m in METHODS]
        if name == "dequantized_copies" and not any(values):
            continue
        cells = [formatter(v) if v or name not in OPTIONAL_ROWS else "-" for v in values]
        lines.append(f"  {label:<20}" + "".join(f"{c:>13}" for c in cells))
    verdicts = ["yes" if plan.fits(m) else "no" for m in METHODS]
    lines.append(f"  {'fits':<20}" + "".join(f"{v:>13}" for v in verdicts))

    lines.append(f"  * = this run. Limit: {format_bytes(plan.limit)} ({plan.limit_source}).")
    if not plan.fits():
        lines.append(f"  This run needs about {format_bytes(plan.estimate.total)}, more than "
                     f"the limit. Changes that fit:")
        lines += [f"    - {suggestion}" for suggestion in plan.suggestions]
    return lines


def compare_peak(plan: MemoryPlan, measured: int) -> str:
    """Return a log line with the measured peak beside the estimate and their difference."""
    estimated = plan.estimate.total
    error = 100 * (estimated - measured) / max(measured, 1)
    return (f"memory: measured peak {format_bytes(measured)}, estimated "
            f"{format_bytes(estimated)} for the widest batch ({error:+.0f}%); a batch wider "
            f"than the ones run so far can still raise the peak")


def batch_target_tokens(examples: list, config) -> int:
    """Return the most target tokens in one micro-batch of the first epoch."""
    lengths = [len(example.tokens) for example in examples]
    batches = batch_indices(lengths, config.batch_size, config.seed, epoch=0)
    return max(sum(examples[i].num_targets for i in batch) for batch in batches)


def settings_from_config(config, targets: list[str], train_split=None) -> PlanSettings:
    """Return the plan settings of a TrainConfig.

    With the encoded training split, the batch width and target tokens come from its
    examples. Without it, every batch is max_seq_length wide and every token is a target.
    """
    longest, target_tokens = config.max_seq_length, None
    if train_split is not None:
        longest = train_split.summary.longest
        target_tokens = batch_target_tokens(train_split.examples, config)
    return PlanSettings(batch_size=config.batch_size,
                        sequence_length=batch_width(longest, config.max_seq_length),
                        r=config.r, targets=list(targets), grad_checkpoint=config.grad_checkpoint,
                        lora_dropout=config.lora_dropout,
                        grad_accumulation_steps=config.grad_accumulation_steps,
                        target_tokens=target_tokens)


def plan_training(loaded, config, targets: list[str], train_split=None) -> MemoryPlan:
    """Estimate the memory of training ``loaded`` (a LoadedModel) with ``config``.

    ``train_split`` is the EncodedSplit of the training data, when it is known.
    """
    layout = describe_model(loaded.model, loaded.config)
    settings = settings_from_config(config, targets, train_split)
    selected = "qlora" if layout.loaded_quantized else "lora"
    return plan_memory(layout, settings, selected, source_quantization(loaded.model_path))


def log_plan(plan: MemoryPlan) -> None:
    """Log the plan table, with a warning when the run is estimated not to fit."""
    lines = describe_plan(plan)
    for line in lines[:-len(plan.suggestions) - 1] if not plan.fits() else lines:
        logger.info("%s", line)
    if not plan.fits():
        logger.warning("estimated memory %s exceeds the %s of %s; changes that fit: %s",
                       format_bytes(plan.estimate.total), plan.limit_source,
                       format_bytes(plan.limit), "; ".join(plan.suggestions))
