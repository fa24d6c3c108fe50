"""`mlxlora plan`: parameter counts and a memory estimate before training."""

import json

import click

from mlxlora.commands.options import config_options
from mlxlora.config import resolve_config


def encoded_train_split(config, tokenizer):
    """Return the encoded training split, or None without --data."""
    if config.data is None:
        return None
    from mlxlora.data_formats import find_splits, read_examples
    from mlxlora.prompt import encode_split

    train = find_splits(config.data)["train"]
    examples = read_examples(train, config.prompt_key, config.completion_key)
    return encode_split(examples, tokenizer, config)


def build_plan(config):
    """Load the model as `train` would and return (LoadedModel, MemoryPlan)."""
    from mlxlora.attach import resolve_targets
    from mlxlora.loading import load_model
    from mlxlora.memory_plan import plan_training

    loaded = load_model(config.model, dtype=config.dtype, dequantize=config.dequantize,
                        trust_remote_code=config.trust_remote_code)
    targets = resolve_targets(loaded.model, config.target_modules, config.layers)
    return loaded, plan_training(loaded, config, targets, encoded_train_split(config, loaded.tokenizer))


@click.command("plan")
@click.option("--recipe", type=click.Path(dir_okay=False), default=None,
              help="YAML file of training config values; flags given here override it.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as one JSON object.")
@config_options()
def command(recipe: str | None, as_json: bool, **flags) -> None:
    """Count parameters and estimate the memory of a training run before starting it.

    Takes the same options as `train`. The model is loaded as training would load it, and
    the table shows LoRA, QLoRA and full fine-tuning side by side for the chosen rank,
    target modules, batch size and sequence length. Without --data, every batch is
    --max-seq-length tokens wide and every token is trained. With --data, the width comes
    from the longest training example and the logits from the trained tokens per batch.
    """
    from mlxlora.memory_plan import describe_plan

    config = resolve_config(recipe, flags).config
    loaded, plan = build_plan(config)

    if as_json:
        click.echo(json.dumps({"model": config.model, "dtype": loaded.dtype, **plan.to_dict()}))
        return
    base = "quantized (QLoRA)" if loaded.quantized else loaded.dtype
    click.echo(f"model {config.model}: base weights {base}, compute dtype {loaded.dtype}")
    for line in describe_plan(plan):
        click.echo(line)
