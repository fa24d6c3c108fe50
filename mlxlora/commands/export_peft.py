"""`mlxlora export-peft`: write an adapter in Hugging Face PEFT's layout."""

import logging
from pathlib import Path

import click

logger = logging.getLogger("mlxlora")


@click.command("export-peft")
@click.argument("adapter_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--base-model", default=None,
              help="base_model_name_or_path to record, such as the Hub id of the model a GGUF "
                   "file came from. Default: the --model the adapter was trained with.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
              default="float32", show_default=True,
              help="Tensor dtype in adapter_model.safetensors; float32 keeps every bit.")
@click.option("--force", is_flag=True, help="Replace a PEFT adapter already in OUT_DIR.")
def command(adapter_dir: Path, out_dir: Path, base_model: str | None, dtype: str,
            force: bool) -> None:
    """Export the adapter in ADAPTER_DIR as a PEFT LoRA adapter in OUT_DIR.

    OUT_DIR receives adapter_config.json and adapter_model.safetensors, which
    PeftModel.from_pretrained loads onto the transformers version of the base model.
    """
    from mlxlora.peft_io import export_peft

    config = export_peft(adapter_dir, out_dir, base_model=base_model, dtype=dtype,
                         overwrite=force)
    logger.info("Wrote PEFT adapter %s: r=%d, lora_alpha=%s, target_modules=%s%s",
                out_dir, config["r"], config["lora_alpha"], config["target_modules"],
                describe_layers(config["layers_to_transform"]))


def describe_layers(layers_to_transform: list[int] | None) -> str:
    if layers_to_transform is None:
        return ""
    return f", layers_to_transform={layers_to_transform}"
