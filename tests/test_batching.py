"""Batch order and padding."""

import numpy as np
import pytest

from mlxlora.batching import batch_indices, collate, pad_token_id
from mlxlora.config import TrainConfig
from mlxlora.data_formats import read_examples
from mlxlora.errors import ModelError
from mlxlora.prompt import EncodedExample, encode_split
from mlxlora.testing.tiny import make_tokenizer

LENGTHS = [5, 40, 12, 7, 33, 40, 1, 18, 25, 9, 12]


def test_batch_indices_deterministic():
    first = batch_indices(LENGTHS, 3, seed=4, epoch=2)
    second = batch_indices(list(LENGTHS), 3, seed=4, epoch=2)

    assert first == second


def test_batch_indices_cover_every_example_once():
    batches = batch_indices(LENGTHS, 3, seed=0, epoch=0)

    assert sorted(index for batch in batches for index in batch) == list(range(len(LENGTHS)))
    assert sorted(len(batch) for batch in batches) == [2, 3, 3, 3]


def test_batch_indices_length_buckets():
    batches = batch_indices(LENGTHS, 3, seed=1, epoch=0)

    ranges = sorted((min(LENGTHS[i] for i in batch), max(LENGTHS[i] for i in batch)) for batch in batches)
    assert ranges == [(1, 7), (9, 12), (18, 33), (40, 40)]


def test_batch_indices_shuffles_by_seed_and_epoch():
    orders = {
        tuple(map(tuple, batch_indices(list(range(40)), 2, seed=seed, epoch=epoch)))
        for seed, epoch in [(0, 0), (0, 1), (1, 0), (1, 1)]
    }
    sorted_order = tuple((2 * k, 2 * k + 1) for k in range(20))

    assert len(orders) == 4
    assert sorted_order not in orders


def test_batch_indices_rejects_zero_batch():
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        batch_indices(LENGTHS, 0, seed=0, epoch=0)


def example(tokens, mask, source):
    return EncodedExample(list(tokens), list(mask), source)


def test_collate_shifts_and_pads():
    rows = [
        example([1, 2, 3, 4], [False, False, True, True], "a:1"),
        example([5, 6], [False, True], "a:2"),
    ]

    batch = collate(rows, pad_id=0, pad_to_multiple=4)

    assert batch.inputs.tolist() == [[1, 2, 3, 0], [5, 0, 0, 0]]
    assert batch.targets.tolist() == [[2, 3, 4, 0], [6, 0, 0, 0]]
    assert batch.mask.tolist() == [[0, 1, 1, 0], [1, 0, 0, 0]]
    assert batch.inputs.dtype == np.int32
    assert batch.targets.dtype == np.int32
    assert batch.mask.dtype == np.float32
    assert batch.sources == ["a:1", "a:2"]
    assert batch.num_targets == 3


@pytest.mark.parametrize("longest, multiple, width", [(2, 32, 32), (33, 32, 32), (34, 32, 64), (10, 1, 9), (9, 8, 8)])
def test_collate_pads_to_multiple(longest, multiple, width):
    rows = [example(range(1, longest + 1), [True] * longest, "a:1"), example([1, 2], [False, True], "a:2")]

    batch = collate(rows, pad_id=0, pad_to_multiple=multiple)

    assert batch.inputs.shape == (2, width)
    assert batch.targets.shape == (2, width)
    assert batch.mask.shape == (2, width)


def test_collate_never_targets_padding():
    # The pad id equals a real token id, as when a tokenizer pads with its EOS.
    rows = [example([7, 9, 9], [False, True, True], "a:1"), example([7, 9], [False, True], "a:2")]

    batch = collate(rows, pad_id=9, pad_to_multiple=8)

    assert batch.mask.sum(axis=1).tolist() == [2, 1]
    assert batch.mask[:, 2:].sum() == 0
    assert batch.num_targets == 3


def test_pad_token_id_fallback():
    tokenizer = make_tokenizer()
    assert pad_token_id(tokenizer) == tokenizer.pad_token_id

    tokenizer.pad_token = None
    assert pad_token_id(tokenizer) == tokenizer.eos_token_id

    tokenizer.eos_token = None
    with pytest.raises(ModelError, match="neither a pad token nor an EOS token"):
        pad_token_id(tokenizer)


def test_collate_encoded_split(tmp_path):
    tokenizer = make_tokenizer()
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "a", "completion": "bc"}\n{"prompt": "de", "completion": "f"}\n')
    split = encode_split(read_examples(path), tokenizer, TrainConfig())

    [indices] = batch_indices([len(e.tokens) for e in split.examples], 2, seed=0, epoch=0)
    batch = collate([split.examples[i] for i in indices], pad_token_id(tokenizer), pad_to_multiple=8)

    assert batch.num_targets == 5
    assert batch.inputs.shape == (2, 24)
    assert batch.mask[batch.targets == tokenizer.pad_token_id].sum() == 0
    assert (batch.targets[batch.mask == 1] == tokenizer.eos_token_id).sum() == 2
