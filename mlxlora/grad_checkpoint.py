"""Gradient checkpointing for the transformer blocks of one model instance.

Each block's activations are recomputed in the backward pass instead of being kept, which
trades about a third more compute for memory that no longer grows with the number of
blocks. Only this model's block instances change class: a subclass is made per block class,
so other models of the same class in the process are untouched.
"""

import mlx.core as mx
import mlx.nn as nn

_subclasses: dict[type, type] = {}


def _checkpointed_subclass(cls: type) -> type:
    if cls in _subclasses:
        return _subclasses[cls]

    original_call = cls.__call__

    def checkpointed_call(self, *args, **kwargs):
        def run_block(trainable, *inner_args, **inner_kwargs):
            # mx.checkpoint only differentiates its explicit inputs, so the trainable
            # parameters are passed in and written back before the block runs.
            self.update(trainable)
            return original_call(self, *inner_args, **inner_kwargs)

        return mx.checkpoint(run_block)(self.trainable_parameters(), *args, **kwargs)

    subclass = type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": checkpointed_call})
    _subclasses[cls] = subclass
    return subclass


def enable_grad_checkpoint(model: nn.Module) -> None:
    """Recompute each transformer block of ``model`` during the backward pass."""
    for block in model.layers:
        if type(block) not in _subclasses.values():
            block.__class__ = _checkpointed_subclass(type(block))
