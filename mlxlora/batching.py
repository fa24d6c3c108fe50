"""Group encoded examples into padded batches in a deterministic, resumable order."""

from dataclasses import dataclass

import numpy as np

from mlxlora.errors import ModelError
from mlxlora.prompt import EncodedExample


@dataclass
class Batch:
    """Padded model inputs, next-token targets and loss mask of a batch, each (B, L).

    ``mask`` is 1.0 where the target counts in the loss and 0.0 on prompts and padding.
    ``num_targets`` is the number of 1.0 entries in ``mask``.
    """

    inputs: np.ndarray
    targets: np.ndarray
    mask: np.ndarray
    sources: list[str]
    num_targets: int


def batch_indices(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Return batches of example indices for one epoch.

    Examples are sorted by token count and cut into batches of batch_size, so a batch pads
    little; the last batch may be smaller. Ties in length are broken and the batch order is
    shuffled by a generator seeded with (seed, epoch), so the same arguments always give the
    same batches, which exact resume and data-parallel training rely on.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")

    rng = np.random.default_rng([seed, epoch])
    tie_order = rng.permutation(len(lengths))
    by_length = sorted(tie_order.tolist(), key=lambda index: lengths[index])

    batches = [by_length[start:start + batch_size] for start in range(0, len(by_length), batch_size)]
    order = rng.permutation(len(batches))
    return [batches[index] for index in order]


def mean_targets_per_step(examples: list[EncodedExample], batch_size: int,
                          grad_accumulation_steps: int = 1) -> float:
    """Return the mean number of target tokens in an optimizer step of one epoch.

    This is the constant that TrainStep's ``tokens_per_step`` expects: the mean target count
    of an example times the examples of one optimizer step (all micro-batches).
    """
    if not examples:
        raise ValueError("mean_targets_per_step needs at least one example")
    mean_targets = sum(example.num_targets for example in examples) / len(examples)
    return mean_targets * batch_size * grad_accumulation_steps


def collate(encoded: list[EncodedExample], pad_id: int, pad_to_multiple: int = 32) -> Batch:
    """Pad examples into one Batch of inputs tokens[:-1], targets tokens[1:] and mask[1:].

    The width is the longest row rounded up to pad_to_multiple, which bounds how many
    distinct shapes mx.compile has to trace.
    """
    if not encoded:
        raise ValueError("collate needs at least one example")
    if pad_to_multiple < 1:
        raise ValueError(f"pad_to_multiple must be at least 1, got {pad_to_multiple}")

    longest = max(len(example.tokens) for example in encoded) - 1
    width = max(pad_to_multiple, -(-longest // pad_to_multiple) * pad_to_multiple)

    inputs = np.full((len(encoded), width), pad_id, dtype=np.int32)
    targets = np.full((len(encoded), width), pad_id, dtype=np.int32)
    mask = np.zeros((len(encoded), width), dtype=np.float32)
    for row, example in enumerate(encoded):
        count = len(example.tokens) - 1
        if count <= 0:
            continue
        inputs[row, :count] = example.tokens[:-1]
        targets[row, :count] = example.tokens[1:]
        mask[row, :count] = example.mask[1:]

    return Batch(inputs, targets, mask, [example.source for example in encoded], int(mask.sum()))


def pad_token_id(tokenizer) -> int:
    """Return the id used for padding: the tokenizer's pad token, else its EOS token."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise ModelError("The tokenizer defines neither a pad token nor an EOS token, so batches "
                     "cannot be padded. Use a tokenizer that defines eos_token.")
