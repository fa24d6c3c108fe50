"""`mlxlora fuse`: merge a trained adapter into its base model and save the result."""

import click

from mlxlora.fuse import GGUF_TYPES, OUTPUT_DTYPES, FuseOptions


@click.command("fuse")
@click.option("--model", default=None,
              help="Base model (Hub id, folder or .gguf file). Default: the base_model "
                   "recorded in the adapter's adapter_config.json.")
@click.option("--adapter-path", default="adapters", show_default=True,
              help="Adapter folder written by mlxlora train.")
@click.option("--save-path", default="fused_model", show_default=True,
              help="Folder for the fused model (Hugging Face layout).")
@click.option("--dequantize", is_flag=True,
              help="Write float weights for a quantized base instead of quantizing the fused "
                   "layers again.")
@click.option("--force-quantized", is_flag=True,
              help="Write the requantized model even when the check finds that "
                   "requantization lost the adapter.")
@click.option("--dtype", type=click.Choice(OUTPUT_DTYPES), default="auto", show_default=True,
              help="Float dtype of the saved weights. auto: the dtype the base checkpoint "
                   "stores (float16 for a quantized GGUF).")
@click.option("--export-gguf", type=click.Path(dir_okay=False), default=None,
              help="Also write the fused model to this .gguf file (llama models only).")
@click.option("--gguf-type", type=click.Choice(GGUF_TYPES), default="f16", show_default=True,
              help="Tensor type of the --export-gguf file.")
@click.option("--upload-repo", default=None,
              help="Upload the fused folder to this Hugging Face Hub repo (namespace/name).")
@click.option("--overwrite", is_flag=True,
              help="Replace the model files in a non-empty --save-path.")
@click.option("--trust-remote-code", is_flag=True, help="Allow model code from the Hub repo to run.")
def command(**options) -> None:
    """Merge a LoRA adapter into its base model: W' = W + scaling * B @ A.

    After the merge the fused model's logits are compared with base + adapter on a few
    examples of the training data. When requantizing a quantized base rounds the update
    away, the dequantized model is written instead (unless --force-quantized).
    """
    from mlxlora.fuse import fuse_adapter

    report = fuse_adapter(FuseOptions(**options))

    layout = "quantized" if report.quantized_output else report.dtype
    click.echo(f"Fused {report.fused_layers} layers into {report.save_path} ({layout}).")
    click.echo(f"Check against base + adapter ({report.prompts_source}): "
               f"{report.logits.describe()}.")
    for warning in report.warnings:
        click.echo(f"Warning: {warning}", err=True)
    if report.gguf_path:
        click.echo(f"GGUF: {report.gguf_path}")
    if report.upload_url:
        click.echo(f"Uploaded: {report.upload_url}")
    click.echo(f"Try it: mlxlora chat --model {report.save_path}")
