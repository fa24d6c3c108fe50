"""Load a base model with its adapter (or a fused model) and run it: answers, logits, loss.

Chat, generate and eval share these functions, and so can fuse and its checks. Prompts are
encoded with ``mlxlora.prompt``, the code that training uses, so the model sees the same
tokens at inference as in training.
"""

import json
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterator

import jinja2
import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxlora.adapters import CONFIG_FILE, AdapterSpec, load_adapter, read_adapter_spec
from mlxlora.attach import lora_layers
from mlxlora.batching import batch_indices, collate, pad_token_id
from mlxlora.config import DEFAULT_MODEL
from mlxlora.errors import AdapterError, ModelError
from mlxlora.loading import LoadedModel, load_model
from mlxlora.loss import masked_loss
from mlxlora.prompt import EncodedExample, encode_prompt, encode_text, eos_token_ids, with_single_bos

logger = logging.getLogger("mlxlora")

# A prompt is a conversation (chat messages ending in a user turn) or a plain text that the
# model continues without a chat template, as text-format training data is trained.
Prompt = list[dict] | str


@dataclass
class InferenceModel(LoadedModel):
    """A loaded model in eval mode, with the adapter attached when one was given."""

    adapter_path: Path | None = None
    adapter: AdapterSpec | None = None

    @property
    def has_adapter(self) -> bool:
        return self.adapter is not None


@dataclass
class GenerationSettings:
    """Sampling settings; temp 0 is greedy decoding, top_p 1.0 turns nucleus sampling off."""

    temp: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int | None = None


@dataclass
class Answer:
    """A generated answer.

    ``finish_reason`` is "stop" (an end-of-turn token) or "length" (max_tokens reached).
    ``num_tokens`` counts the generated tokens, the end-of-turn token included.
    """

    text: str
    finish_reason: str
    num_tokens: int


@dataclass
class LossResult:
    """Token-weighted mean loss of a data split and its perplexity, exp(loss)."""

    loss: float
    perplexity: float
    num_examples: int
    num_targets: int


def load_for_inference(model: str | None = None, adapter_path: str | Path | None = None,
                       dtype: str = "auto", dequantize: bool | None = None) -> InferenceModel:
    """Load a model, attach the adapter in ``adapter_path`` if given, and switch to eval mode.

    Without ``model`` the base model named in the adapter's adapter_config.json is loaded,
    and without either the default model. The tokenizer's stop set is widened to every
    end-of-turn id that the model files name (see ``stop_token_ids``).
    """
    folder = Path(adapter_path) if adapter_path is not None else None
    spec = read_spec(folder) if folder is not None else None
    loaded = load_base(model, spec, folder, dtype, dequantize)

    if spec is not None:
        load_adapter(loaded.model, folder)
    # Loaders and attach_lora leave modules in training mode, which would apply LoRA dropout.
    loaded.model.eval()
    loaded.tokenizer.eos_token_ids = stop_token_ids(loaded)

    values = {field.name: getattr(loaded, field.name) for field in fields(LoadedModel)}
    return InferenceModel(**values, adapter_path=folder, adapter=spec)


def read_spec(folder: Path) -> AdapterSpec:
    """Read adapter_config.json, with hints for a run without a final adapter and a model folder."""
    if not (folder / CONFIG_FILE).is_file() and (folder / "config.json").is_file():
        raise AdapterError(
            f"--adapter-path {folder}: this is a model folder (config.json, no {CONFIG_FILE}), "
            f"such as a fused model. Pass it with --model {folder} instead.")

    best = folder / "best" / CONFIG_FILE
    if not (folder / CONFIG_FILE).is_file() and best.is_file():
        raise AdapterError(
            f"--adapter-path {folder}: no final adapter ({CONFIG_FILE}) yet, so training has "
            f"not finished or stopped early. Pass --adapter-path {best.parent} to use the best "
            f"adapter so far.")
    return read_adapter_spec(folder)


def load_base(model: str | None, spec: AdapterSpec | None, folder: Path | None, dtype: str,
              dequantize: bool | None) -> LoadedModel:
    if model is not None:
        return load_model(model, dtype=dtype, dequantize=dequantize)
    if spec is None:
        return load_model(DEFAULT_MODEL, dtype=dtype, dequantize=dequantize)

    try:
        return load_model(spec.base_model, dtype=dtype, dequantize=dequantize)
    except ModelError as error:
        raise ModelError(
            f"{folder / CONFIG_FILE} names base model {spec.base_model!r}, which failed to "
            f"load. Pass the base model with --model.\n{error}") from None


def stop_token_ids(loaded: LoadedModel) -> set[int]:
    """Return every token id that ends an answer.

    This is the union of the tokenizer's EOS ids, eos_token_id of the model config, and
    eos_token_id of generation_config.json in a model folder, because some chat models end
    a turn with a token that only their generation config lists.
    """
    ids = set(eos_token_ids(loaded.tokenizer))
    ids |= id_set(loaded.config.get("eos_token_id"))

    generation_config = Path(loaded.model_path) / "generation_config.json"
    if generation_config.is_file():
        try:
            content = json.loads(generation_config.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            logger.warning("%s is unreadable and was ignored: %s", generation_config, error)
        else:
            ids |= id_set(content.get("eos_token_id"))
    return ids


def id_set(value) -> set[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return {value}
    if isinstance(value, list):
        return {item for item in value if isinstance(item, int) and not isinstance(item, bool)}
    return set()


@contextmanager
def adapters_disabled(model: nn.Module):
    """Run the model as its base inside the block by setting every LoRA scaling to 0.

    With scaling 0 each LoRALinear returns exactly its base layer's output, so no second copy
    of the base model is needed. The original scalings are restored on exit, also on errors.
    """
    layers = list(lora_layers(model).values())
    saved = [layer.scaling for layer in layers]
    for layer in layers:
        layer.scaling = 0.0
    try:
        yield model
    finally:
        for layer, scaling in zip(layers, saved):
            layer.scaling = scaling


def prompt_tokens(tokenizer, prompt: Prompt) -> list[int]:
    """Encode a prompt as training encodes it; raise ModelError if the chat template fails."""
    if isinstance(prompt, str):
        return with_single_bos(tokenizer, encode_text(tokenizer, prompt))

    try:
        return encode_prompt(tokenizer, prompt)
    except (jinja2.TemplateError, ValueError, TypeError, KeyError, IndexError) as error:
        roles = ", ".join(message.get("role", "?") for message in prompt)
        raise ModelError(
            f"The model's chat template failed on a conversation with roles {roles}: {error}. "
            f"Some templates reject a system prompt or two turns of the same role in a row.") from None


def stream_responses(loaded: LoadedModel, prompt: Prompt, settings: GenerationSettings):
    """Yield mlx-lm GenerationResponse objects for the answer to ``prompt``.

    Generation stops at any id in ``loaded.tokenizer.eos_token_ids`` (load_for_inference
    fills it with stop_token_ids) or after settings.max_tokens tokens.
    """
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    tokens = prompt_tokens(loaded.tokenizer, prompt)
    if settings.seed is not None:
        mx.random.seed(settings.seed)
    sampler = make_sampler(settings.temp, settings.top_p)
    yield from stream_generate(loaded.model, loaded.tokenizer, tokens,
                               max_tokens=settings.max_tokens, sampler=sampler)


def stream_answer(loaded: LoadedModel, prompt: Prompt, settings: GenerationSettings) -> Iterator[str]:
    """Yield the answer to ``prompt`` as text pieces, as they are generated."""
    for response in stream_responses(loaded, prompt, settings):
        if response.text:
            yield response.text


def generate_answer(loaded: LoadedModel, prompt: Prompt, settings: GenerationSettings) -> Answer:
    """Generate the whole answer to ``prompt``."""
    pieces, last = [], None
    for response in stream_responses(loaded, prompt, settings):
        pieces.append(response.text)
        last = response
    return Answer("".join(pieces), last.finish_reason, last.generation_tokens)


def logits_for(model: nn.Module, token_lists: list[list[int]]) -> list[mx.array]:
    """Return float32 logits of shape (len(tokens), vocab) for each token list.

    The lists run as one right-padded batch. Attention is causal, so padding after a
    sequence does not change its logits.
    """
    if not token_lists or not all(token_lists):
        raise ValueError("logits_for needs at least one non-empty token list")

    width = max(len(tokens) for tokens in token_lists)
    inputs = np.zeros((len(token_lists), width), dtype=np.int32)
    for row, tokens in enumerate(token_lists):
        inputs[row, : len(tokens)] = tokens

    logits = model(mx.array(inputs)).astype(mx.float32)
    mx.eval(logits)
    return [logits[row, : len(tokens)] for row, tokens in enumerate(token_lists)]


def split_loss(model: nn.Module, tokenizer, examples: list[EncodedExample],
               batch_size: int) -> LossResult:
    """Compute the masked loss over encoded examples exactly as training's validation does.

    Batches come from batch_indices with seed 0 and epoch 0 and the token losses are summed
    in the same order as mlxlora.trainer.validation_loss, so the same data gives the same
    number. The model should be in eval mode, so that LoRA dropout is off.
    """
    pad_id = pad_token_id(tokenizer)
    lengths = [len(example.tokens) for example in examples]
    one = mx.array(1.0)

    loss_sum, count = mx.array(0.0), mx.array(0.0)
    for indices in batch_indices(lengths, batch_size, seed=0, epoch=0):
        batch = collate([examples[i] for i in indices], pad_id)
        mask = mx.array(batch.mask)
        # A normalizer of 1 makes masked_loss return the sum of the token losses.
        batch_loss = masked_loss(model, mx.array(batch.inputs), mx.array(batch.targets), mask, one)
        loss_sum, count = loss_sum + batch_loss, count + mask.sum()
        mx.eval(loss_sum, count)

    loss = float(loss_sum.item() / max(count.item(), 1.0))
    return LossResult(loss, math.exp(min(loss, 50.0)), len(examples), int(count.item()))
