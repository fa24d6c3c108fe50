"""`mlxlora import-peft`: convert a Hugging Face PEFT LoRA adapter into an mlxlora adapter."""

import logging
from pathlib import Path

import click

logger = logging.getLogger("mlxlora")


@click.command("import-peft")
@click.argument("peft_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--model", "model_spec", default=None,
              help="Base model to load, in any form `mlxlora train --model` takes. Default: "
                   "base_model_name_or_path in PEFT_DIR/adapter_config.json.")
@click.option("--force", is_flag=True, help="Replace an mlxlora adapter already in OUT_DIR.")
def command(peft_dir: Path, out_dir: Path, model_spec: str | None, force: bool) -> None:
    """Convert the PEFT adapter in PEFT_DIR into an mlxlora adapter in OUT_DIR.

    Every command that takes an adapter also loads PEFT folders directly. Converting adds the
    base model's fingerprint, so later loads check that the right base model is used.
    """
    from mlxlora.errors import AdapterError
    from mlxlora.loading import load_model
    from mlxlora.peft_config import read_peft_config
    from mlxlora.peft_io import import_peft

    # Reading the config first reports a bad folder before the slow model load.
    config = read_peft_config(peft_dir)
    if model_spec is None:
        model_spec = config.get("base_model_name_or_path")
        if not model_spec:
            raise AdapterError(f"{peft_dir / 'adapter_config.json'} names no "
                               "base_model_name_or_path; pass --model")

    loaded = load_model(model_spec)
    spec = import_peft(loaded.model, peft_dir, out_dir, model_spec, overwrite=force)
    logger.info("Wrote mlxlora adapter %s: %d modules, r=%d, lora_alpha=%s, base model %s",
                out_dir, len(spec.target_modules), spec.r, spec.lora_alpha, model_spec)
