"""Everything a training run prepares before its first step: model, data, adapter, optimizer."""

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from mlxlora import blas
from mlxlora.adapters import AdapterSpec, base_fingerprint, base_signature
from mlxlora.attach import attach_lora, parameter_counts, resolve_targets
from mlxlora.batching import batch_indices, mean_targets_per_step
from mlxlora.config import ResolvedConfig
from mlxlora.data_check import check_before_training
from mlxlora.errors import ConfigError
from mlxlora.data_formats import find_splits, read_examples
from mlxlora.grad_checkpoint import enable_grad_checkpoint
from mlxlora.hyperparams import choose_learning_rate, hyperparameter_warnings
from mlxlora.dequantized_matmul import use_dequantized_matmul
from mlxlora.lean_mlp import enable_lean_swiglu
from mlxlora.loading import LoadedModel, load_model, on_gpu
from mlxlora.memory_plan import MemoryPlan, log_plan, plan_training
from mlxlora.prompt import encode_split
from mlxlora.schedule import build_schedule, default_warmup
from mlxlora.step import TrainStep

logger = logging.getLogger("mlxlora")

ADAM_STATE_FLOATS = 2


@dataclass
class Session:
    resolved: ResolvedConfig
    loaded: LoadedModel
    spec: AdapterSpec
    train_split: object
    valid_split: object | None
    optimizer: optim.Optimizer
    step: TrainStep
    total_steps: int
    batches_per_epoch: int
    learning_rate: float
    schedule: object
    group: object | None
    run_dir: Path
    memory_plan: MemoryPlan | None = None

    @property
    def config(self):
        return self.resolved.config

    @property
    def is_main(self) -> bool:
        return self.group is None or self.group.rank() == 0


# Bytes of freed buffers that MLX keeps for reuse on CPU, chosen in configure_device.
CPU_CACHE_LIMIT = 1 << 30


def configure_device() -> None:
    """Raise the CPU buffer cache limit and log which BLAS and device MLX uses.

    MLX's CPU default keeps 32 MB of freed buffers, so every step reallocates its
    activations, and a larger cache made steps 10-15% faster. A cache as large as a quarter
    of RAM made things worse: on SmolLM2-135M (batch 8, 2-core x86_64 VM, mlx 0.32.4) the
    process grew to 11.4 GB for a 4.4 GB peak, and the steps that touched new memory spent up
    to 23 s in page faults. With CPU_CACHE_LIMIT the same 16 steps took 96 s instead of 123 s
    (docs/benchmarks.md).
    """
    device = mx.default_device()
    if device == mx.cpu:
        mx.set_cache_limit(CPU_CACHE_LIMIT)
        logger.info("device: CPU; BLAS: %s", blas.status)
        if not blas.is_fast():
            logger.warning("matrix multiplication uses the slow reference BLAS: %s", blas.status)
    else:
        logger.info("device: %s", device)


def distributed_group(batch_size: int | None = None):
    """Return the mx.distributed group when launched with several processes, else None.

    Raises ConfigError for a hostfile that cannot be read (mlx would wait forever for peers
    that never come) and for a batch size that does not split evenly across processes.
    """
    hostfile = os.environ.get("MLX_HOSTFILE")
    if hostfile and not os.access(hostfile, os.R_OK):
        raise ConfigError(f"MLX_HOSTFILE={hostfile}: file not found or not readable; write the "
                          "hostfile (see docs/distributed.md) or unset MLX_HOSTFILE")
    if not mx.distributed.is_available():
        return None

    group = mx.distributed.init()
    if group.size() == 1:
        if hostfile:
            logger.warning("MLX_HOSTFILE is set but this process runs alone: no distributed "
                           "backend connected, training on one process")
        return None

    if batch_size is not None and batch_size % group.size() != 0:
        raise ConfigError(f"--batch-size {batch_size} is not divisible by the {group.size()} "
                          f"processes; use a multiple of {group.size()}, e.g. "
                          f"{group.size() * max(1, batch_size // group.size())}")
    return group


def load_splits(config, tokenizer):
    """Read, validate and encode train and valid splits; raise DataError before any compute."""
    splits = find_splits(config.data)
    if not config.skip_data_check:
        check_before_training(config, tokenizer)
    encoded = {}
    for name in ("train", "valid"):
        if name not in splits:
            continue
        examples = read_examples(splits[name], config.prompt_key, config.completion_key)
        encoded[name] = encode_split(examples, tokenizer, config)
        for line in encoded[name].summary.describe():
            logger.info("data %s: %s", name, line)
    return encoded["train"], encoded.get("valid")


def count_steps(config, num_examples: int, world: int) -> tuple[int, int]:
    """Return (total optimizer steps, batches per epoch)."""
    batches_per_epoch = math.ceil(num_examples / config.batch_size)
    if config.iters is not None:
        return config.iters, batches_per_epoch
    micro_batches = math.ceil(config.epochs * batches_per_epoch)
    return max(1, math.ceil(micro_batches / config.grad_accumulation_steps)), batches_per_epoch


def attach_adapter(config, loaded: LoadedModel) -> AdapterSpec:
    model = loaded.model
    fingerprint, signature = base_fingerprint(model), base_signature(model)
    paths = resolve_targets(model, config.target_modules, config.layers)

    mx.random.seed(config.seed)
    attach_lora(model, paths, config.r, config.lora_alpha, config.lora_dropout,
                config.use_rslora)
    if loaded.quantized and not on_gpu():
        changed = use_dequantized_matmul(model)
        logger.info("speed: %d quantized layers dequantize their weight for each matmul on "
                    "the CPU (float32 BLAS) and keep it quantized in memory", changed)
    lean = enable_lean_swiglu(model, loaded.config.get("hidden_size"),
                              getattr(mx, loaded.dtype, mx.float32))
    if lean:
        logger.info("memory: %d SwiGLU MLPs recompute sigmoid(gate) in the backward pass "
                    "instead of keeping it", lean)
    if config.grad_checkpoint:
        enable_grad_checkpoint(model)
    # mlx-lm's loaders leave models in eval mode, which would switch LoRA dropout off.
    model.train()
    mx.eval(model.parameters())

    return AdapterSpec(base_model=config.model, base_fingerprint=fingerprint,
                       base_signature=signature, r=config.r,
                       lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                       use_rslora=config.use_rslora, target_modules=paths, layers=config.layers)


def log_parameters(model: nn.Module, spec: AdapterSpec) -> None:
    total, trainable = parameter_counts(model)
    base = total - trainable
    saved_bytes = (base - trainable) * ADAM_STATE_FLOATS * 4
    logger.info("LoRA on %d modules, r=%d, lora_alpha=%g, scaling=%.4g%s",
                len(spec.target_modules), spec.r, spec.lora_alpha,
                spec.lora_alpha / (spec.r ** 0.5 if spec.use_rslora else spec.r),
                " (rsLoRA)" if spec.use_rslora else "")
    logger.info("trainable parameters: %s of %s (%.3f%%); AdamW state %.1f MB instead of %.1f "
                "MB for full fine-tuning (%.1f MB saved)", f"{trainable:,}", f"{base:,}",
                100 * trainable / base, trainable * 8 / 1e6, base * 8 / 1e6, saved_bytes / 1e6)


def base_weights_note(loaded: LoadedModel) -> str:
    """Return the model log line's note on quantization: kept (QLoRA), dequantized, or none."""
    if loaded.quantized:
        return ", quantized base: QLoRA"
    if loaded.dequantized:
        return (f", quantized weights dequantized to {loaded.dtype}; --no-dequantize keeps "
                "them quantized (QLoRA)")
    return ""


def prepare_session(resolved: ResolvedConfig, run_dir: Path, group=None) -> Session:
    config = resolved.config
    world = group.size() if group else 1
    configure_device()

    loaded = load_model(config.model, dtype=config.dtype, dequantize=config.dequantize,
                        trust_remote_code=config.trust_remote_code)
    logger.info("model: %s (%s, %s%s)", config.model, loaded.config.get("model_type"),
                loaded.dtype, base_weights_note(loaded))

    train_split, valid_split = load_splits(config, loaded.tokenizer)
    spec = attach_adapter(config, loaded)
    log_parameters(loaded.model, spec)
    memory_plan = plan_training(loaded, config, spec.target_modules, train_split)
    log_plan(memory_plan)

    total_steps, batches_per_epoch = count_steps(config, len(train_split.examples), world)
    hidden_size = loaded.config.get("hidden_size", 0)
    model_type = loaded.config.get("model_type", "")
    choice = choose_learning_rate(config.learning_rate, config.full_ft_lr, model_type, hidden_size)
    logger.info("learning rate %.3g: %s", choice.value, choice.reason)
    effective_batch = config.batch_size * config.grad_accumulation_steps
    for warning in hyperparameter_warnings(choice.value, effective_batch, model_type, hidden_size):
        logger.warning(warning)

    warmup = config.warmup_steps if config.warmup_steps is not None else default_warmup(total_steps)
    schedule = build_schedule(choice.value, total_steps, config.lr_schedule, warmup,
                              config.min_lr_ratio)
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=config.weight_decay)
    tokens_per_step = mean_targets_per_step(train_split.examples, config.batch_size,
                                            config.grad_accumulation_steps)
    step = TrainStep(loaded.model, optimizer, config.max_grad_norm, group,
                     tokens_per_step=tokens_per_step)

    return Session(resolved, loaded, spec, train_split, valid_split, optimizer, step, total_steps,
                   batches_per_epoch, choice.value, schedule, group, run_dir, memory_plan)


def epoch_batches(session: Session, epoch: int) -> list[list[int]]:
    lengths = [len(e.tokens) for e in session.train_split.examples]
    return batch_indices(lengths, session.config.batch_size, session.config.seed, epoch)
