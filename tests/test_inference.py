"""Loading for inference, disabling adapters, stop tokens, generation, logits and split loss.

The save_tiny_adapter helper is shared with the chat, generate and eval tests.
"""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import mlxlora  # noqa: F401  (loads OpenBLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest

from mlxlora.adapters import AdapterSpec, base_fingerprint, base_signature, save_adapter
from mlxlora.attach import attach_lora, lora_layers, resolve_targets
from mlxlora.config import TrainConfig
from mlxlora.data_formats import Example
from mlxlora.errors import AdapterError, ModelError
from mlxlora.inference import (GenerationSettings, adapters_disabled, generate_answer,
                               load_for_inference, logits_for, prompt_tokens, split_loss,
                               stop_token_ids, stream_answer)
from mlxlora.loading import LoadedModel
from mlxlora.prompt import encode_prompt, encode_split
from mlxlora.step import TrainStep
from mlxlora.testing.tiny import make_model, make_tokenizer, save_model_folder
from mlxlora.trainer import validation_loss

HELLO = [{"role": "user", "content": "hello"}]


def save_tiny_adapter(folder: Path, model_folder: Path, seed: int = 1) -> Path:
    """Save an attention adapter with random, nonzero B matrices for the model in model_folder."""
    model = make_model()
    fingerprint, signature = base_fingerprint(model), base_signature(model)
    paths = resolve_targets(model, ["attention"])
    mx.random.seed(seed)
    attach_lora(model, paths, r=4, lora_alpha=8.0, lora_dropout=0.5)
    for layer in lora_layers(model).values():
        layer.lora_B = mx.random.normal(layer.lora_B.shape) * 0.5
    spec = AdapterSpec(str(model_folder), fingerprint, signature, 4, 8.0, 0.5, False, paths, None)
    save_adapter(folder, model, spec)
    return folder


@pytest.fixture
def tiny_run(tmp_path):
    """(model folder, adapter folder) of the tiny llama and an adapter trained on it."""
    model_folder = save_model_folder(tmp_path / "model")
    return model_folder, save_tiny_adapter(tmp_path / "adapter", model_folder)


class BigramModel(nn.Module):
    """A stub language model whose next token depends only on the last token.

    ``successors`` maps a token id to the id it always predicts; other tokens predict
    ``default``. It has no layers, so mlx-lm's generation gives it an empty cache.
    """

    def __init__(self, vocab_size: int, successors: dict[int, int], default: int):
        super().__init__()
        table = np.full((vocab_size, vocab_size), -30.0, dtype=np.float32)
        table[:, default] = 0.0
        for previous, following in successors.items():
            table[previous] = -30.0
            table[previous, following] = 0.0
        self.table = mx.array(table)
        self.layers = []

    def __call__(self, inputs, cache=None):
        return self.table[inputs]


def bigram_loaded(tmp_path, stop_id: int, generation_config: dict | None = None) -> LoadedModel:
    """A LoadedModel whose answer to any chat prompt is "Hi" followed by stop_id, then "x"."""
    tokenizer = make_tokenizer()
    byte = {text: tokenizer.encode(text, add_special_tokens=False)[0] for text in "\nHix"}
    model = BigramModel(260, {byte["\n"]: byte["H"], byte["H"]: byte["i"], byte["i"]: stop_id},
                        default=byte["x"])
    if generation_config is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation_config))
    return LoadedModel(model, tokenizer, "bigram", tmp_path, {}, False, "float32")


def test_adapter_alone_names_base_model(tiny_run):
    model_folder, adapter_folder = tiny_run
    loaded = load_for_inference(adapter_path=adapter_folder)

    assert loaded.has_adapter
    assert loaded.model_path == model_folder
    assert loaded.adapter.r == 4
    assert len(lora_layers(loaded.model)) == 8


def test_inference_model_in_eval_mode(tiny_run):
    _, adapter_folder = tiny_run
    loaded = load_for_inference(adapter_path=adapter_folder)
    tokens = [[5, 70, 101, 33]]

    assert not loaded.model.training
    # LoRA dropout 0.5 is stored in the adapter; in eval mode two passes agree.
    first, second = logits_for(loaded.model, tokens)[0], logits_for(loaded.model, tokens)[0]
    np.testing.assert_array_equal(np.array(first), np.array(second))


def test_model_without_adapter(tiny_run):
    model_folder, _ = tiny_run
    loaded = load_for_inference(str(model_folder))
    assert not loaded.has_adapter
    assert lora_layers(loaded.model) == {}


def test_unfinished_run_points_to_best(tmp_path, tiny_run):
    _, adapter_folder = tiny_run
    run = tmp_path / "run"
    run.mkdir()
    adapter_folder.rename(run / "best")
    with pytest.raises(AdapterError, match="no final adapter") as error:
        load_for_inference(adapter_path=run)
    assert f"--adapter-path {run / 'best'}" in str(error.value)


def test_model_folder_as_adapter_path(tiny_run):
    model_folder, _ = tiny_run
    with pytest.raises(AdapterError, match=f"this is a model folder .* --model {model_folder} instead"):
        load_for_inference(adapter_path=model_folder)


def test_unloadable_base_named_in_config(tmp_path, tiny_run):
    _, adapter_folder = tiny_run
    config_path = adapter_folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model"] = str(tmp_path / "gone")
    config_path.write_text(json.dumps(config))

    with pytest.raises(ModelError) as error:
        load_for_inference(adapter_path=adapter_folder)
    assert f"names base model {str(tmp_path / 'gone')!r}" in str(error.value)
    assert "Pass the base model with --model" in str(error.value)


def test_adapter_on_other_base_rejected(tmp_path, tiny_run):
    _, adapter_folder = tiny_run
    model = make_model()
    model.model.norm.weight = model.model.norm.weight * 2
    other = save_model_folder(tmp_path / "other", model)
    with pytest.raises(AdapterError, match="its weights differ"):
        load_for_inference(str(other), adapter_folder)


def test_adapters_disabled_gives_base_logits(tiny_run):
    model_folder, adapter_folder = tiny_run
    adapted = load_for_inference(adapter_path=adapter_folder)
    base = load_for_inference(str(model_folder))
    tokens = [[5, 70, 101, 33, 200]]

    with adapters_disabled(adapted.model):
        inside = np.array(logits_for(adapted.model, tokens)[0])
    after = np.array(logits_for(adapted.model, tokens)[0])

    np.testing.assert_array_equal(inside, np.array(logits_for(base.model, tokens)[0]))
    assert not np.allclose(after, inside)


def test_adapters_disabled_restores_scaling(tiny_run):
    _, adapter_folder = tiny_run
    model = load_for_inference(adapter_path=adapter_folder).model
    layers = list(lora_layers(model).values())
    layers[0].scaling = 3.0

    with adapters_disabled(model):
        assert [layer.scaling for layer in layers] == [0.0] * 8
    assert [layer.scaling for layer in layers] == [3.0] + [2.0] * 7

    with pytest.raises(RuntimeError):
        with adapters_disabled(model):
            raise RuntimeError("generation failed")
    assert [layer.scaling for layer in layers] == [3.0] + [2.0] * 7


def test_generation_stops_at_eos(tmp_path):
    loaded = bigram_loaded(tmp_path, stop_id=make_tokenizer().eos_token_id)
    loaded.tokenizer.eos_token_ids = stop_token_ids(loaded)

    answer = generate_answer(loaded, HELLO, GenerationSettings(max_tokens=50))
    assert answer.text == "Hi"
    assert answer.finish_reason == "stop"
    assert answer.num_tokens == 3


def test_generation_stops_at_max_tokens(tmp_path):
    loaded = bigram_loaded(tmp_path, stop_id=make_tokenizer().eos_token_id)
    answer = generate_answer(loaded, HELLO, GenerationSettings(max_tokens=1))
    assert answer.text == "H"
    assert answer.finish_reason == "length"


def test_stop_set_includes_generation_config(tmp_path):
    endoftext = make_tokenizer().convert_tokens_to_ids("<|endoftext|>")
    loaded = bigram_loaded(tmp_path, stop_id=endoftext,
                           generation_config={"eos_token_id": [endoftext, 7]})
    loaded.config["eos_token_id"] = 9

    assert stop_token_ids(loaded) == {loaded.tokenizer.eos_token_id, endoftext, 7, 9}

    loaded.tokenizer.eos_token_ids = stop_token_ids(loaded)
    answer = generate_answer(loaded, HELLO, GenerationSettings(max_tokens=5))
    assert answer.text == "Hi"
    assert answer.finish_reason == "stop"


def test_stop_set_without_generation_config_misses_turn_end(tmp_path):
    endoftext = make_tokenizer().convert_tokens_to_ids("<|endoftext|>")
    loaded = bigram_loaded(tmp_path, stop_id=endoftext)
    # Without a stop id for <|endoftext|>, generation runs on to max_tokens.
    answer = generate_answer(loaded, HELLO, GenerationSettings(max_tokens=5))
    assert answer.finish_reason == "length"


def test_load_widens_tokenizer_stop_set(tiny_run):
    model_folder, _ = tiny_run
    (model_folder / "generation_config.json").write_text('{"eos_token_id": [257, 3]}')
    loaded = load_for_inference(str(model_folder))
    assert {257, 3} <= loaded.tokenizer.eos_token_ids
    assert loaded.tokenizer.eos_token_id in loaded.tokenizer.eos_token_ids


def test_stream_pieces_join_to_answer(tiny_run):
    _, adapter_folder = tiny_run
    loaded = load_for_inference(adapter_path=adapter_folder)
    settings = GenerationSettings(temp=0.8, top_p=0.9, max_tokens=12, seed=3)

    streamed = "".join(stream_answer(loaded, HELLO, settings))
    assert streamed == generate_answer(loaded, HELLO, settings).text
    assert streamed == generate_answer(loaded, HELLO, settings).text


def test_text_prompt_skips_template():
    tokenizer = make_tokenizer(bos=True)
    tokens = prompt_tokens(tokenizer, "Once upon")
    assert tokens[0] == tokenizer.bos_token_id
    assert tokenizer.decode(tokens[1:]) == "Once upon"
    assert prompt_tokens(tokenizer, HELLO) == encode_prompt(tokenizer, HELLO)


def test_failing_template_is_model_error(tiny_run):
    model_folder, _ = tiny_run
    loaded = load_for_inference(str(model_folder))
    loaded.tokenizer.chat_template = "{{ raise_exception('no system role') }}"
    with pytest.raises(ModelError, match="roles system, user: no system role"):
        generate_answer(loaded, [{"role": "system", "content": "be brief"}] + HELLO,
                        GenerationSettings(max_tokens=2))


def test_logits_for_unpadded_match(tiny_model):
    lists = [[5, 70, 101], [9, 8, 7, 6, 5]]
    batched = logits_for(tiny_model, lists)

    assert [tuple(x.shape) for x in batched] == [(3, 260), (5, 260)]
    for tokens, logits in zip(lists, batched):
        alone = tiny_model(mx.array([tokens])).astype(mx.float32)[0]
        np.testing.assert_allclose(np.array(logits), np.array(alone), atol=1e-5)


def test_logits_for_rejects_empty(tiny_model):
    with pytest.raises(ValueError, match="non-empty"):
        logits_for(tiny_model, [[1, 2], []])


def chat_examples(count: int) -> list[Example]:
    examples = []
    for index in range(count):
        messages = [{"role": "user", "content": f"question {index} " + "?" * index},
                    {"role": "assistant", "content": f"answer {index}" + "!" * (index % 3)}]
        examples.append(Example(f"test.jsonl:{index + 1}", "chat", messages, None, {}))
    return examples


def test_split_loss_equals_validation_loss(tiny_run):
    _, adapter_folder = tiny_run
    loaded = load_for_inference(adapter_path=adapter_folder)
    config = TrainConfig(batch_size=3, val_batches=-1)
    split = encode_split(chat_examples(7), loaded.tokenizer, config)

    result = split_loss(loaded.model, loaded.tokenizer, split.examples, batch_size=3)

    step = TrainStep(loaded.model, optim.SGD(learning_rate=0.0), None, compile=False)
    session = SimpleNamespace(valid_split=split, config=config, loaded=loaded, group=None,
                              step=step)
    assert result.loss == validation_loss(session)
    assert result.perplexity == pytest.approx(math.exp(result.loss), rel=1e-12)
    assert result.num_examples == 7
    assert result.num_targets == sum(example.num_targets for example in split.examples)


def test_split_loss_base_differs_from_adapter(tiny_run):
    _, adapter_folder = tiny_run
    loaded = load_for_inference(adapter_path=adapter_folder)
    split = encode_split(chat_examples(4), loaded.tokenizer, TrainConfig())

    adapted = split_loss(loaded.model, loaded.tokenizer, split.examples, 2).loss
    with adapters_disabled(loaded.model):
        base = split_loss(loaded.model, loaded.tokenizer, split.examples, 2).loss
    assert adapted != base
    assert math.isfinite(base)
