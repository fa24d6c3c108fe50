"""Merge a LoRA adapter into its base model: W' = W + scaling * B @ A for each adapted layer.

A quantized base is dequantized for the merge. The fused layers are then kept in float
(``dequantize``) or quantized again with the base's group size, bits and mode. Quantizing
again can round a small update away and leave a model that behaves like the base. So every
fuse compares the fused model's logits with those of base + adapter on a few prompts, and a
requantized model that lost the update is written dequantized unless the user insists.
"""

import json
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from mlxlora.adapters import (
    CONFIG_FILE,
    AdapterSpec,
    embedding_matrix,
    load_adapter,
    read_adapter_spec,
)
from mlxlora.attach import lora_layers
from mlxlora.dequantized_matmul import dequantized_weight
from mlxlora.errors import AdapterError, ConfigError, MlxloraError, ModelError
from mlxlora.lora import LoRALinear, lora_scaling

logger = logging.getLogger("mlxlora")

TRAINING_CONFIG_FILE = "training_config.json"
OUTPUT_DTYPES = ("auto", "float32", "bfloat16", "float16")
GGUF_TYPES = ("f16", "f32")

CHECK_PROMPTS = 4
CHECK_TOKENS = 128
FALLBACK_PROMPTS = (
    "What is the capital of France?",
    "Write two sentences about the sea.",
    "List three prime numbers and explain why they are prime.",
    "Summarize what a recipe for bread needs.",
)

# A requantized fuse counts as lost when less than this fraction of the float update
# survives in the quantized weights (projected onto the update) ...
MIN_KEPT_FRACTION = 0.5
# ... or when its logits are further than this from base + adapter, relative to how far
# the base model's logits are from base + adapter.
MAX_RELATIVE_DISTANCE = 0.5
# Below this greedy token agreement with base + adapter, a requantized model is kept but
# gets a warning. The relative distance is a poor guide here: in the SmolLM2-135M Q4_1
# weather-json fuse of docs/fuse.md it was 0.29 with 100% agreement and identical replies.
MIN_TOP1_AGREEMENT = 0.95


@dataclass
class FuseOptions:
    """The inputs of ``mlxlora fuse``; names follow mlx_lm.fuse's options."""

    adapter_path: str
    save_path: str
    model: str | None = None
    dequantize: bool = False
    force_quantized: bool = False
    dtype: str = "auto"
    export_gguf: str | None = None
    gguf_type: str = "f16"
    upload_repo: str | None = None
    overwrite: bool = False
    trust_remote_code: bool = False


@dataclass
class FusedLayer:
    """An adapted layer before the merge and its merged float replacement."""

    original: nn.Module
    merged: nn.Linear


@dataclass
class RequantizationCheck:
    """How much of the float weight update survived quantizing the fused layers again.

    ``kept_fraction`` is sum <Q - W, D> / sum |D|^2 over the layers, where D is the float
    update and Q - W the change of the requantized weights against the base: 1 means the
    update survived in full, 0 that it was rounded away. ``error_ratio`` is
    |Q - W - D| / |D|, the quantization error relative to the update.
    """

    kept_fraction: float
    error_ratio: float
    layers: int


@dataclass
class LogitsComparison:
    """Logits of the fused model against base + adapter over the compared rows.

    ``relative_distance`` is |fused - adapter| / |base - adapter| (Frobenius norms over all
    compared rows): 0 for a perfect fuse, about 1 for a model that behaves like the base.
    """

    max_abs_diff: float
    mean_abs_diff: float
    adapter_shift: float
    relative_distance: float
    top1_agreement: float
    positions: int

    def describe(self) -> str:
        return (f"max |fused - base+adapter| = {self.max_abs_diff:.3g}, mean "
                f"{self.mean_abs_diff:.3g}; the adapter itself moves logits by up to "
                f"{self.adapter_shift:.3g}; relative distance {self.relative_distance:.3g}; "
                f"greedy token agreement {self.top1_agreement:.1%} over {self.positions} "
                "positions")


@dataclass
class FuseReport:
    """The result of ``fuse_adapter``: the files written and the fuse check."""

    save_path: Path
    base_model: str
    fused_layers: int
    dtype: str
    quantized_output: bool
    prompts_source: str
    logits: LogitsComparison | None
    requantization: RequantizationCheck | None = None
    adapter_lost: bool = False
    gguf_path: Path | None = None
    upload_url: str | None = None
    warnings: list[str] = field(default_factory=list)


def float_weight(module: nn.Module) -> mx.array:
    """Return a linear layer's weight in float32, dequantizing a quantized layer."""
    if isinstance(module, nn.QuantizedLinear):
        return dequantized_weight(module).astype(mx.float32)
    return module.weight.astype(mx.float32)


def merged_linear(layer: LoRALinear) -> nn.Linear:
    """Return a float nn.Linear with weight W + scaling * B @ A, computed in float32.

    The result keeps the dtype of a float base and stays float32 for a quantized base,
    whose weights are quantized again or cast later.
    """
    base = layer.base
    weight = float_weight(base) + layer.delta_weight().astype(mx.float32)
    if not isinstance(base, nn.QuantizedLinear):
        weight = weight.astype(base.weight.dtype)

    has_bias = "bias" in base
    out_features, in_features = weight.shape
    merged = nn.Linear(in_features, out_features, bias=has_bias)
    merged.weight = weight
    if has_bias:
        merged.bias = base.bias
    return merged


def fuse_lora(model: nn.Module) -> dict[str, FusedLayer]:
    """Replace every LoRALinear of ``model`` with its merged float layer."""
    fused = {}
    for path, layer in lora_layers(model).items():
        fused[path] = FusedLayer(original=layer.base, merged=merged_linear(layer))

    model.update_modules(tree_unflatten([(path, f.merged) for path, f in fused.items()]))
    mx.eval(model.parameters())
    return fused


def requantize(model: nn.Module, fused: dict[str, FusedLayer]) -> RequantizationCheck | None:
    """Quantize each merged layer whose base was quantized, with the base's settings.

    Returns how much of the update survived, or None when no fused layer was quantized.
    """
    replacements = []
    dot = update_norm = error_norm = 0.0
    for path, layer in fused.items():
        original = layer.original
        if not isinstance(original, nn.QuantizedLinear):
            continue

        quantized = layer.merged.to_quantized(group_size=original.group_size,
                                              bits=original.bits, mode=original.mode)
        base_weight = float_weight(original)
        update = layer.merged.weight.astype(mx.float32) - base_weight
        change = float_weight(quantized) - base_weight
        dot += (change * update).sum().item()
        update_norm += (update * update).sum().item()
        error_norm += ((change - update) ** 2).sum().item()
        replacements.append((path, quantized))

    if not replacements:
        return None
    model.update_modules(tree_unflatten(replacements))
    mx.eval(model.parameters())

    if update_norm == 0.0:
        return RequantizationCheck(1.0, 0.0, len(replacements))
    return RequantizationCheck(kept_fraction=dot / update_norm,
                               error_ratio=math.sqrt(error_norm / update_norm),
                               layers=len(replacements))


def restore_float(model: nn.Module, fused: dict[str, FusedLayer]) -> None:
    """Put the merged float layers back in place of their requantized versions."""
    model.update_modules(tree_unflatten([(path, f.merged) for path, f in fused.items()]))


def check_targets(model: nn.Module, spec: AdapterSpec, folder: Path, config: dict) -> None:
    """Raise AdapterError for adapted modules that a merge cannot handle.

    Only linear layers are merged. An embedding cannot take a LoRALinear, and a tied
    lm_head has no weight of its own: merging into it would also change the embedding.
    """
    modules = dict(model.named_modules())
    tied = bool(config.get("tie_word_embeddings", False))
    problems = []
    for path in spec.target_modules:
        module = modules.get(path)
        if module is None and path.rpartition(".")[2] == "lm_head" and tied:
            problems.append(
                f"{folder / CONFIG_FILE}: target {path}: this model ties lm_head to "
                "embed_tokens (tie_word_embeddings), so lm_head has no weight of its own to "
                "merge into. Train the adapter without lm_head.")
        elif isinstance(module, (nn.Embedding, nn.QuantizedEmbedding)):
            tied_note = (" The output layer shares this weight (tie_word_embeddings), so a "
                         "merged update would change the output layer as well."
                         if tied else "")
            problems.append(
                f"{folder / CONFIG_FILE}: target {path} is an embedding; only linear layers "
                f"can be fused.{tied_note} Train the adapter without {path}.")
        elif module is not None and not isinstance(module, (nn.Linear, nn.QuantizedLinear)):
            problems.append(
                f"{folder / CONFIG_FILE}: target {path} is a {type(module).__name__}; only "
                "linear layers can be fused.")
    if problems:
        raise AdapterError(problems)


def check_output_path(save_path: Path, model_path: Path, adapter_folder: Path,
                      overwrite: bool) -> None:
    """Raise ConfigError when writing to ``save_path`` would damage an input or a model."""
    target = save_path.expanduser().resolve()
    if target == model_path.resolve():
        raise ConfigError(f"--save-path {save_path} is the input model {model_path}; writing "
                          "there would replace the base weights. Choose a new folder.")
    if target == adapter_folder.resolve():
        raise ConfigError(f"--save-path {save_path} is the adapter folder; choose a new folder "
                          "for the fused model.")
    if target.exists() and not target.is_dir():
        raise ConfigError(f"--save-path {save_path} is a file; pass a folder.")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ConfigError(f"--save-path {save_path} is not empty. Pass --overwrite to replace "
                          "the model files in it, or choose a new folder.")


def check_gguf_path(gguf_path: Path, model_path: Path) -> None:
    if gguf_path.expanduser().resolve() == model_path.resolve():
        raise ConfigError(f"--export-gguf {gguf_path} is the input model; choose a new file.")
    if gguf_path.suffix.lower() != ".gguf":
        raise ConfigError(f"--export-gguf {gguf_path}: the file name must end in .gguf.")


def remove_old_weights(folder: Path) -> None:
    """Delete weight files of an earlier model, which mlx-lm would otherwise load too."""
    for path in list(folder.glob("model*.safetensors")) + [folder / "model.safetensors.index.json"]:
        if path.is_file():
            path.unlink()


def find_training_config(adapter_folder: Path) -> Path:
    """Return the run's training_config.json for a run folder, its best/ folder or a
    checkpoints/step-N folder."""
    folder = adapter_folder.resolve()
    for candidate in (folder, folder.parent, folder.parent.parent):
        path = candidate / TRAINING_CONFIG_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"no {TRAINING_CONFIG_FILE} in {adapter_folder} or the run "
                            "folder above it")


def resolve_data_path(data: str, training_config: Path) -> str:
    """Return the data path of a run, trying a relative one also against the run's parents.

    A relative --data path is relative to the folder training ran in. The run does not
    record that folder, but the run folder usually sits below it.
    """
    path = Path(data)
    if path.is_absolute() or path.exists():
        return data
    for folder in training_config.resolve().parents:
        if (folder / path).exists():
            return str(folder / path)
    return data


def training_examples(adapter_folder: Path) -> tuple[list, str]:
    """Return the first examples of the adapter's validation (else training) data."""
    from mlxlora.data_formats import find_splits, read_examples

    path = find_training_config(adapter_folder)
    content = json.loads(path.read_text(encoding="utf-8"))
    config = content["config"]
    splits = find_splits(resolve_data_path(config["data"], path))
    split = splits.get("valid", splits["train"])
    examples = read_examples(split, config.get("prompt_key", "prompt"),
                             config.get("completion_key", "completion"))
    return examples[:CHECK_PROMPTS], str(split)


@dataclass
class CheckPrompt:
    """Tokens to run through the model and the logits rows to compare."""

    tokens: list[int]
    rows: list[int]


def answer_rows(mask: list[bool], length: int) -> list[int]:
    """Return the logits rows that predict target tokens: row j - 1 predicts token j."""
    rows = [index - 1 for index in range(1, length) if mask[index]]
    return rows or list(range(length))


def check_prompts(adapter_folder: Path, tokenizer) -> tuple[list[CheckPrompt], str]:
    """Return the prompts to compare logits on, and a description of where they came from.

    Training examples are used where the run's data can be read, and only the rows that
    predict the answer are compared, because that is where the adapter acts. Fixed prompts
    are the fallback, compared on every row.
    """
    from mlxlora.prompt import encode_example, encode_prompt

    try:
        examples, source = training_examples(adapter_folder)
        prompts = []
        for example in examples:
            encoded = encode_example(example, tokenizer)
            tokens = encoded.tokens[:CHECK_TOKENS]
            if tokens:
                prompts.append(CheckPrompt(tokens, answer_rows(encoded.mask, len(tokens))))
        if prompts:
            return prompts, f"answer tokens of {source}"
        reason = "it has no usable examples"
    except (MlxloraError, OSError, ValueError, KeyError, TypeError) as error:
        reason = f"{type(error).__name__}: {error}"

    logger.info("the fuse check uses %d fixed prompts because the run's training data could "
                "not be used (%s)", len(FALLBACK_PROMPTS), reason)
    prompts = []
    for text in FALLBACK_PROMPTS:
        tokens = encode_prompt(tokenizer, [{"role": "user", "content": text}])[:CHECK_TOKENS]
        prompts.append(CheckPrompt(tokens, list(range(len(tokens)))))
    return prompts, "fixed prompts"


@contextmanager
def float_layers_on_cpu(model: nn.Module):
    """Swap quantized layers for dequantized copies while computing on a CPU.

    Quantized matmul has no BLAS path on a CPU and is many times slower than a float one;
    the dequantized copy computes the same function. The original layers return afterwards.
    """
    from mlxlora.loading import on_gpu

    quantized = [(path, module) for path, module in model.named_modules()
                 if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    if on_gpu() or not quantized:
        yield
        return

    copies = []
    for path, module in quantized:
        weight = float_weight(module) if isinstance(module, nn.QuantizedLinear) else (
            embedding_matrix(module))
        if isinstance(module, nn.QuantizedLinear):
            copy = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in module)
            if "bias" in module:
                copy.bias = module.bias
        else:
            copy = nn.Embedding(weight.shape[0], weight.shape[1])
        # Affine scales carry the compute dtype; mxfp4 and similar modes store uint8 scales.
        if mx.issubdtype(module.scales.dtype, mx.floating):
            weight = weight.astype(module.scales.dtype)
        copy.weight = weight
        copies.append((path, copy))

    model.update_modules(tree_unflatten(copies))
    try:
        yield
    finally:
        model.update_modules(tree_unflatten(quantized))


def forward_logits(model: nn.Module, prompts: list[CheckPrompt]) -> list[mx.array]:
    """Return the float32 logits of each prompt's compared rows."""
    logits = []
    with float_layers_on_cpu(model):
        for prompt in prompts:
            output = model(mx.array([prompt.tokens]))[0][mx.array(prompt.rows)]
            output = output.astype(mx.float32)
            mx.eval(output)
            logits.append(output)
    return logits


def logits_without_adapter(model: nn.Module, prompts: list[CheckPrompt]) -> list[mx.array]:
    """Return the base model's logits by setting every LoRA scaling to zero for a moment."""
    layers = list(lora_layers(model).values())
    scalings = [layer.scaling for layer in layers]
    for layer in layers:
        layer.scaling = 0.0
    try:
        return forward_logits(model, prompts)
    finally:
        for layer, scaling in zip(layers, scalings):
            layer.scaling = scaling


def compare_logits(model: nn.Module, prompts: list[CheckPrompt], adapter_logits: list[mx.array],
                   base_logits: list[mx.array]) -> LogitsComparison:
    """Compare ``model``'s logits with the base + adapter and base logits."""
    max_abs = shift = abs_sum = diff_squares = shift_squares = 0.0
    agree = positions = 0
    for fused, adapter, base in zip(forward_logits(model, prompts), adapter_logits, base_logits):
        difference = fused - adapter
        change = base - adapter
        max_abs = max(max_abs, mx.abs(difference).max().item())
        shift = max(shift, mx.abs(change).max().item())
        abs_sum += mx.abs(difference).sum().item()
        diff_squares += (difference * difference).sum().item()
        shift_squares += (change * change).sum().item()
        agree += (fused.argmax(axis=-1) == adapter.argmax(axis=-1)).sum().item()
        positions += fused.shape[0]

    if shift_squares > 0:
        relative = math.sqrt(diff_squares / shift_squares)
    else:
        relative = 0.0 if diff_squares == 0 else math.inf
    vocab = adapter_logits[0].shape[-1] if adapter_logits else 1
    return LogitsComparison(max_abs_diff=max_abs, mean_abs_diff=abs_sum / max(1, positions * vocab),
                            adapter_shift=shift, relative_distance=relative,
                            top1_agreement=agree / max(1, positions), positions=positions)


def lost_adapter_reasons(check: RequantizationCheck, comparison: LogitsComparison) -> list[str]:
    """Return why a requantized fuse no longer carries the adapter, or [] when it does."""
    reasons = []
    if check.kept_fraction < MIN_KEPT_FRACTION:
        reasons.append(f"only {max(check.kept_fraction, 0.0):.0%} of the weight update "
                       "survived requantization; the rest is smaller than the quantization "
                       "step")
    if comparison.relative_distance > MAX_RELATIVE_DISTANCE:
        reasons.append(f"its logits are {comparison.relative_distance:.2f}x as far from "
                       "base + adapter as the base model's logits are")
    return reasons


def output_dtype(requested: str, model_path: Path) -> str:
    from mlxlora.model_io import checkpoint_dtype

    if requested not in OUTPUT_DTYPES:
        raise ConfigError(f"--dtype {requested!r} is invalid. Use {', '.join(OUTPUT_DTYPES)}.")
    return checkpoint_dtype(model_path) if requested == "auto" else requested


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
               for _, m in model.named_modules())


@dataclass
class Reference:
    """Check prompts with the logits of base + adapter and of the base alone."""

    prompts: list[CheckPrompt]
    source: str
    adapter_logits: list[mx.array]
    base_logits: list[mx.array]

    def compare(self, model: nn.Module) -> LogitsComparison:
        return compare_logits(model, self.prompts, self.adapter_logits, self.base_logits)


def fuse_adapter(options: FuseOptions) -> FuseReport:
    """Fuse the adapter in ``options.adapter_path`` into its base and write the model.

    Raises AdapterError for an adapter folder that is invalid or made for another base,
    ConfigError for unusable output paths or options, and ModelError for a base that
    cannot be loaded or exported.
    """
    from mlxlora.loading import load_model, resolve_model_path

    adapter_folder = Path(options.adapter_path)
    spec = read_adapter_spec(adapter_folder)
    model_spec = options.model or spec.base_model
    if not options.model:
        logger.info("base model %s, from %s", model_spec, adapter_folder / CONFIG_FILE)

    model_path = resolve_model_path(model_spec, options.trust_remote_code)
    save_path = Path(options.save_path).expanduser()
    check_output_path(save_path, model_path, adapter_folder, options.overwrite)
    if options.export_gguf:
        check_gguf_path(Path(options.export_gguf), model_path)
    if options.gguf_type not in GGUF_TYPES:
        raise ConfigError(f"--gguf-type {options.gguf_type!r} is invalid. Use f16 or f32.")
    dtype = output_dtype(options.dtype, model_path)

    # Keep a quantized base quantized, so its own settings can be reused when requantizing.
    loaded = load_model(model_spec, dequantize=False, trust_remote_code=options.trust_remote_code)
    if options.export_gguf and loaded.config.get("model_type") != "llama":
        raise ModelError(f"--export-gguf: only llama-family models can be exported, and "
                         f"{model_spec} is a {loaded.config.get('model_type')} model.")
    check_targets(loaded.model, spec, adapter_folder, loaded.config)
    load_adapter(loaded.model, adapter_folder)
    loaded.model.eval()
    reference = compute_reference(loaded.model, adapter_folder, loaded.tokenizer)

    fused = fuse_lora(loaded.model)
    logger.info("merged W + scaling * B @ A into %d layers (scaling %.4g)", len(fused),
                lora_scaling(spec.r, spec.lora_alpha, spec.use_rslora))
    report = FuseReport(save_path=save_path, base_model=model_spec, fused_layers=len(fused),
                        dtype=dtype, quantized_output=False, prompts_source=reference.source,
                        logits=None)
    model = finish_weights(loaded.model, loaded.quantized, fused, reference, options, report)
    logger.info("fused vs base + adapter on %s: %s", reference.source, report.logits.describe())

    write_output(report, model, loaded, spec, adapter_folder, model_path, options.overwrite)
    if options.export_gguf:
        from mlxlora.gguf_export import export_gguf

        report.gguf_path = Path(options.export_gguf).expanduser()
        export_gguf(report.gguf_path, model, loaded.config, loaded.tokenizer,
                    file_type=options.gguf_type, name=save_path.name)
        logger.info("GGUF (%s) written to %s", options.gguf_type.upper(), report.gguf_path)
    if options.upload_repo:
        from mlxlora.model_io import upload_folder

        report.upload_url = upload_folder(save_path, options.upload_repo)
        logger.info("uploaded %s to %s", save_path, report.upload_url)
    return report


def compute_reference(model: nn.Module, adapter_folder: Path, tokenizer) -> Reference:
    prompts, source = check_prompts(adapter_folder, tokenizer)
    return Reference(prompts, source, forward_logits(model, prompts),
                     logits_without_adapter(model, prompts))


def finish_weights(model: nn.Module, base_quantized: bool, fused: dict[str, FusedLayer],
                   reference: Reference, options: FuseOptions, report: FuseReport) -> nn.Module:
    """Dequantize or requantize the merged model, cast it, and fill in the report's check.

    Returns the model to save, which is a new object when layers were dequantized.
    """
    from mlx_lm.utils import dequantize_model

    from mlxlora.loading import DTYPES

    dtype = report.dtype
    if base_quantized and options.dequantize:
        model = dequantize_model(model)
        logger.info("--dequantize: writing the fused model with %s weights", dtype)
    elif options.dequantize:
        logger.info("--dequantize: the base model is not quantized, so the fused model keeps "
                    "%s weights as usual", dtype)
    elif base_quantized:
        report.requantization = requantize(model, fused)

    model.set_dtype(DTYPES[dtype])
    report.logits = reference.compare(model)

    check = report.requantization
    if check is not None:
        logger.info("requantized %d fused layers: %.1f%% of the weight update kept, "
                    "quantization error %.2fx the update", check.layers,
                    100 * check.kept_fraction, check.error_ratio)
        reasons = lost_adapter_reasons(check, report.logits)
        if reasons and not options.force_quantized:
            warn(report, "requantization lost most of the adapter's effect ("
                 + "; ".join(reasons) + "), so the fused model is written dequantized "
                 f"({dtype}) instead. Pass --force-quantized to write the quantized model "
                 "anyway.")
            report.adapter_lost = True
            restore_float(model, fused)
            model = dequantize_model(model)
            model.set_dtype(DTYPES[dtype])
            report.logits = reference.compare(model)
        elif reasons:
            warn(report, "requantization lost most of the adapter's effect ("
                 + "; ".join(reasons) + "); writing the quantized model anyway because of "
                 "--force-quantized.")
        elif report.logits.top1_agreement < MIN_TOP1_AGREEMENT:
            warn(report, "the requantized model picks a different greedy token than base + "
                 f"adapter at {1 - report.logits.top1_agreement:.0%} of the compared "
                 f"positions (relative logits distance {report.logits.relative_distance:.2f})."
                 " Fuse again with --dequantize for a float model that matches the adapter "
                 "closely.")

    report.quantized_output = is_quantized(model)
    return model


def warn(report: FuseReport, message: str) -> None:
    logger.warning(message)
    report.warnings.append(message)


def hub_repo_id(model_spec: str) -> str | None:
    """Return ``model_spec`` when it names a Hub repo, not a local path or PACKAGE/FILE.gguf."""
    from mlxlora.loading import REPO_ID

    if model_spec.lower().endswith(".gguf") or Path(model_spec).exists():
        return None
    return model_spec if REPO_ID.match(model_spec) else None


def write_output(report: FuseReport, model: nn.Module, loaded, spec: AdapterSpec,
                 adapter_folder: Path, model_path: Path, overwrite: bool) -> None:
    """Write the fused model folder with a model card that records the fuse check."""
    from mlxlora.model_io import render_model_card, save_model_folder

    weights = ("quantized again with the base model's group size and bits"
               if report.quantized_output else report.dtype)
    facts = [
        f"Base model: {report.base_model}",
        f"Adapter: {adapter_folder} (r={spec.r}, lora_alpha={spec.lora_alpha:g}"
        f"{', rsLoRA' if spec.use_rslora else ''}, {report.fused_layers} layers)",
        f"Weights: {weights}",
        f"Logits against base + adapter on {report.prompts_source}: "
        f"{report.logits.describe()}",
    ]
    facts += [f"Warning: {warning}" for warning in report.warnings]
    card = render_model_card(report.save_path.name, str(report.save_path), report.base_model,
                             hub_repo_id(report.base_model), facts)

    quantization = loaded.config.get("quantization") if report.quantized_output else None
    if overwrite and report.save_path.is_dir():
        remove_old_weights(report.save_path)
    save_model_folder(report.save_path, model, loaded.tokenizer, loaded.config,
                      source_path=model_path, dtype=report.dtype, quantization=quantization,
                      model_card=card)
    logger.info("fused model written to %s", report.save_path)
