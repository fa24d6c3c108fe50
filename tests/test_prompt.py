"""Rendering, tokenisation and target masks of training examples, and the chat prompt."""

import json
from itertools import groupby
from pathlib import Path

import pytest

from mlxlora.config import TrainConfig
from mlxlora.data_formats import Example, find_splits, read_examples
from mlxlora.errors import DataError, ModelError
from mlxlora.prompt import (
    EncodedExample,
    encode_example,
    encode_prompt,
    encode_split,
    fit_length,
)
from mlxlora.testing.tiny import CHATML_TEMPLATE, make_tokenizer

SHARED_DATA = Path("/work/shared/data")

SYSTEM = {"role": "system", "content": "Be brief."}
USER_1 = {"role": "user", "content": "hi"}
REPLY_1 = {"role": "assistant", "content": "yo"}
USER_2 = {"role": "user", "content": "2+2?"}
REPLY_2 = {"role": "assistant", "content": "4"}
TWO_TURNS = [SYSTEM, USER_1, REPLY_1, USER_2, REPLY_2]

TWO_TURN_SPANS = [
    ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
     "<|im_start|>assistant\n", False),
    ("yo<|im_end|>", True),
    ("\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", False),
    ("4<|im_end|>", True),
]

# A template without an end-of-turn token, so the encoder must append the EOS itself.
PLAIN_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)

# Replaces earlier assistant replies, as templates that drop past reasoning do.
REWRITING_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' and not loop.last %}{{ '[...]' }}"
    "{% else %}{{ message['content'] }}{% endif %}{{ '<|im_end|>' }}{% endfor %}"
)

TOOL_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message.get('tool_calls') %}{{ message['tool_calls'] | tojson }}"
    "{% else %}{{ message['content'] }}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def bos_tokenizer():
    return make_tokenizer(bos=True)


@pytest.fixture(scope="module")
def plain_tokenizer():
    return make_tokenizer(chat_template=None)


def chat(messages, source="data.jsonl:1", **extra):
    return Example(source, "chat", messages, None, {"messages": messages, **extra})


def completion(prompt, answer, source="data.jsonl:1"):
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return Example(source, "completions", messages, None, {"prompt": prompt, "completion": answer})


def text(value, source="data.jsonl:1"):
    return Example(source, "text", None, value, {"text": value})


def spans(tokenizer, encoded: EncodedExample) -> list[tuple[str, bool]]:
    """Decode runs of tokens that share a mask value into (text, is_target) pairs."""
    pairs = zip(encoded.tokens, encoded.mask)
    return [
        (tokenizer.decode([token for token, _ in run]), target)
        for target, run in ((target, list(run)) for target, run in groupby(pairs, key=lambda p: p[1]))
    ]


def config(**values) -> TrainConfig:
    return TrainConfig(**values)


def test_chat_masks_every_assistant_turn(tokenizer):
    encoded = encode_example(chat(TWO_TURNS), tokenizer)

    assert spans(tokenizer, encoded) == TWO_TURN_SPANS
    assert len(encoded.tokens) == len(encoded.mask)
    assert encoded.source == "data.jsonl:1"


def test_chat_drops_text_after_final_turn(tokenizer):
    encoded = encode_example(chat(TWO_TURNS + [{"role": "user", "content": "bye"}]), tokenizer)

    assert spans(tokenizer, encoded) == TWO_TURN_SPANS


def test_chat_opening_assistant_is_context(tokenizer):
    greeting = {"role": "assistant", "content": "Hello!"}

    encoded = encode_example(chat([greeting, USER_1, REPLY_1]), tokenizer)

    assert spans(tokenizer, encoded) == [
        ("<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
         "<|im_start|>assistant\n", False),
        ("yo<|im_end|>", True),
    ]


def test_chat_eos_once_per_turn(tokenizer):
    eos = tokenizer.eos_token_id
    encoded = encode_example(chat(TWO_TURNS), tokenizer)

    targets = [token for token, target in zip(encoded.tokens, encoded.mask) if target]
    assert targets.count(eos) == 2
    assert encoded.tokens[-1] == eos
    runs = [text for text, target in spans(tokenizer, encoded) if target]
    assert all(run.endswith("<|im_end|>") and run.count("<|im_end|>") == 1 for run in runs)


def test_chat_train_on_prompt(tokenizer):
    encoded = encode_example(chat(TWO_TURNS), tokenizer, train_on_prompt=True)

    assert encoded.mask == [False] + [True] * (len(encoded.tokens) - 1)
    assert encode_example(chat(TWO_TURNS), tokenizer).tokens == encoded.tokens


def test_completion_with_template(tokenizer):
    encoded = encode_example(completion("2+2=", "4"), tokenizer)

    assert spans(tokenizer, encoded) == [
        ("<|im_start|>user\n2+2=<|im_end|>\n<|im_start|>assistant\n", False),
        ("4<|im_end|>", True),
    ]


def test_completion_without_template(plain_tokenizer):
    encoded = encode_example(completion("2+2=", " 4"), plain_tokenizer)

    assert spans(plain_tokenizer, encoded) == [("2+2=", False), (" 4<|im_end|>", True)]


def test_text_all_targets_with_eos(tokenizer):
    encoded = encode_example(text("abc"), tokenizer)

    assert spans(tokenizer, encoded) == [("a", False), ("bc<|im_end|>", True)]


def test_template_without_end_token_gets_eos():
    tokenizer = make_tokenizer(chat_template=PLAIN_TEMPLATE)

    encoded = encode_example(chat([USER_1, REPLY_1, USER_2, REPLY_2]), tokenizer)

    assert spans(tokenizer, encoded) == [
        ("user: hi\nassistant: ", False),
        ("yo\n<|im_end|>", True),
        ("user: 2+2?\nassistant: ", False),
        ("4\n<|im_end|>", True),
    ]


def test_tool_calls_are_targets():
    tokenizer = make_tokenizer(chat_template=TOOL_TEMPLATE)
    call = [{"type": "function", "function": {"name": "now", "arguments": {}}}]
    messages = [
        USER_1,
        {"role": "assistant", "content": None, "tool_calls": call},
        {"role": "tool", "content": "12:00"},
        {"role": "assistant", "content": "noon"},
    ]

    encoded = encode_example(chat(messages), tokenizer)

    assert spans(tokenizer, encoded) == [
        ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", False),
        (json.dumps(call) + "<|im_end|>", True),
        ("\n<|im_start|>tool\n12:00<|im_end|>\n<|im_start|>assistant\n", False),
        ("noon<|im_end|>", True),
    ]


@pytest.mark.parametrize(
    "example",
    [chat(TWO_TURNS), completion("2+2=", "4"), text("abc")],
    ids=["chat", "completions", "text"],
)
def test_bos_once(bos_tokenizer, tokenizer, example):
    bos = bos_tokenizer.bos_token_id

    with_bos = encode_example(example, bos_tokenizer)
    without_bos = encode_example(example, tokenizer)

    assert with_bos.tokens[0] == bos
    assert with_bos.tokens.count(bos) == 1
    assert with_bos.mask[0] is False
    assert with_bos.tokens[1:] == without_bos.tokens
    assert with_bos.mask[2:] == without_bos.mask[1:]
    assert with_bos.mask[1] is (example.kind == "text")
    assert bos not in without_bos.tokens


def test_bos_once_when_template_writes_it():
    tokenizer = make_tokenizer(chat_template="{{ bos_token }}" + CHATML_TEMPLATE, bos=True)
    bos = tokenizer.bos_token_id

    encoded = encode_example(chat(TWO_TURNS), tokenizer)
    prompt = encode_prompt(tokenizer, [USER_1])

    assert encoded.tokens.count(bos) == 1
    assert encoded.tokens[0] == bos
    assert prompt.count(bos) == 1
    assert prompt[0] == bos


def test_first_token_never_target(tokenizer, bos_tokenizer):
    for tok in (tokenizer, bos_tokenizer):
        for example in (text("x"), chat(TWO_TURNS), completion("", "4")):
            assert encode_example(example, tok, train_on_prompt=True).mask[0] is False


@pytest.mark.parametrize("make", [make_tokenizer, lambda: make_tokenizer(bos=True)], ids=["no-bos", "bos"])
def test_encode_prompt_matches_training_prefix(make):
    tokenizer = make()
    encoded = encode_example(chat(TWO_TURNS), tokenizer)

    first = encode_prompt(tokenizer, TWO_TURNS[:2])
    second = encode_prompt(tokenizer, TWO_TURNS[:4])

    assert encoded.tokens[: len(first)] == first
    assert encoded.mask[len(first) - 1 : len(first) + 1] == [False, True]
    assert encoded.tokens[: len(second)] == second
    assert encoded.mask[len(second) - 1 : len(second) + 1] == [False, True]


def test_encode_prompt_text(tokenizer):
    prompt = encode_prompt(tokenizer, [USER_1])

    assert tokenizer.decode(prompt) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_encode_prompt_without_template(plain_tokenizer):
    assert plain_tokenizer.decode(encode_prompt(plain_tokenizer, [USER_1])) == "hi"

    with pytest.raises(ModelError, match="no chat template"):
        encode_prompt(plain_tokenizer, [USER_1, REPLY_1, USER_2])


def test_chat_without_template_raises(plain_tokenizer):
    examples = [chat(TWO_TURNS, source=f"train.jsonl:{n}") for n in (1, 2)]

    with pytest.raises(DataError) as single:
        encode_example(examples[0], plain_tokenizer)
    with pytest.raises(DataError) as split:
        encode_split(examples, plain_tokenizer, config())

    assert single.value.problems[0].startswith("train.jsonl:1: chat data needs a chat template")
    assert "Use a chat or instruct model" in single.value.problems[0]
    assert "convert the data to text format" in single.value.problems[0]
    assert len(split.value.problems) == 1
    assert split.value.problems[0].startswith("train.jsonl (2 chat examples): chat data needs")


def test_rewriting_template_raises():
    tokenizer = make_tokenizer(chat_template=REWRITING_TEMPLATE)

    with pytest.raises(DataError) as caught:
        encode_example(chat([USER_1, REPLY_1, USER_2, REPLY_2], source="chat.jsonl:3"), tokenizer)

    message = caught.value.problems[0]
    assert message.startswith("chat.jsonl:3: the model's chat template is not prefix-consistent")
    assert "first 3 messages" in message
    assert "single-turn examples" in message


def test_template_exception_raises():
    template = "{{ raise_exception('Conversation roles must alternate') }}"
    tokenizer = make_tokenizer(chat_template=template)

    with pytest.raises(DataError) as caught:
        encode_example(chat([USER_1, REPLY_1], source="chat.jsonl:9"), tokenizer)

    message = caught.value.problems[0]
    assert message.startswith("chat.jsonl:9: the model's chat template failed")
    assert "Conversation roles must alternate" in message


def test_fit_length(tokenizer):
    encoded = encode_example(text("abcdef"), tokenizer)

    kept = fit_length(encoded, 4, "truncate")

    assert kept.tokens == encoded.tokens[:4]
    assert kept.mask == encoded.mask[:4]
    assert fit_length(encoded, 4, "drop") is None
    assert fit_length(encoded, 7, "drop") is encoded
    assert fit_length(encoded, 7, "truncate") is encoded


def long_and_short_chats():
    prompt = "p" * 30
    return [
        completion("q", "short", source="f.jsonl:1"),
        completion(prompt, "answer", source="f.jsonl:2"),
        completion("q", "a much longer answer than the limit", source="f.jsonl:3"),
    ]


def test_split_truncate_summary(tokenizer):
    # The chat markup around a completion takes 20 tokens, so a 40-token limit keeps line 1,
    # cuts line 2 inside its prompt and cuts line 3 inside its answer.
    split = encode_split(long_and_short_chats(), tokenizer, config(max_seq_length=40))

    summary = split.summary
    assert [e.source for e in split.examples] == ["f.jsonl:1", "f.jsonl:3"]
    assert all(len(e.tokens) <= 40 for e in split.examples)
    assert summary.total == 3
    assert summary.long == ["f.jsonl:2", "f.jsonl:3"]
    assert summary.lost_targets == ["f.jsonl:2", "f.jsonl:3"]
    assert summary.dropped == []
    assert summary.untrainable == ["f.jsonl:2"]
    assert summary.longest == 56
    assert summary.describe()[0] == (
        "2 of 3 examples are longer than max_seq_length 40 (longest: 56 tokens; "
        "--max-seq-length sets the limit): f.jsonl:2, f.jsonl:3"
    )
    assert "skipped because they have no training target" in summary.describe()[-1]


def test_split_drop_summary(tokenizer):
    split = encode_split(long_and_short_chats(), tokenizer, config(max_seq_length=40, long_examples="drop"))

    summary = split.summary
    assert [e.source for e in split.examples] == ["f.jsonl:1"]
    assert summary.long == ["f.jsonl:2", "f.jsonl:3"]
    assert summary.dropped == ["f.jsonl:2", "f.jsonl:3"]
    assert summary.lost_targets == []
    assert summary.untrainable == []


def test_split_nothing_trainable(tokenizer):
    with pytest.raises(DataError) as caught:
        encode_split([completion("p" * 50, "x", source="f.jsonl:1")], tokenizer, config(max_seq_length=10))

    assert caught.value.problems[0].startswith("f.jsonl: no example has a training target left")


def test_split_gathers_problems():
    tokenizer = make_tokenizer(chat_template=REWRITING_TEMPLATE)
    examples = [chat([USER_1, REPLY_1, USER_2, REPLY_2], source=f"f.jsonl:{n}") for n in (1, 2)]

    with pytest.raises(DataError) as caught:
        encode_split(examples, tokenizer, config())

    assert [p.split(": ")[0] for p in caught.value.problems] == ["f.jsonl:1", "f.jsonl:2"]


@pytest.mark.parametrize("name, kind", [("wikisql", "text"), ("identity-chat", "chat"), ("wwdc25", "completions")])
def test_shared_data_sets_encode(tokenizer, name, kind):
    folder = SHARED_DATA / name
    if not folder.is_dir():
        pytest.skip(f"shared data set {name} not found at {folder}")

    for split_name, path in find_splits(str(folder)).items():
        examples = read_examples(path)
        split = encode_split(examples, tokenizer, config(max_seq_length=4096))

        assert {example.kind for example in examples} == {kind}, split_name
        assert len(split.examples) == len(examples), split_name
        assert all(encoded.num_targets > 0 for encoded in split.examples), split_name
        assert all(encoded.tokens[-1] == tokenizer.eos_token_id for encoded in split.examples), split_name
