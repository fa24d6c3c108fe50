"""Train once with one tool and write its measurements as JSON (run by vs_mlx_lm.py).

    python benchmarks/run_tool.py {mlx_lm|mlxlora|mlxlora-checkpoint} SETTINGS.json RESULT.json

Both tools run in a process set up the same way: mlxlora is imported first, so both get the
same BLAS (OpenBLAS on Linux), and each runs its own training code path unchanged: mlx-lm's
``mlx_lm.lora.train_model`` (what ``mlx_lm lora --train`` calls) and mlxlora's
``mlxlora.trainer.train`` (what ``mlxlora train`` calls). Wrappers only take timestamps.

The timed loop runs from the start of the first step to the end of the last one, so it
includes compilation and data collation but not model loading or saving. Peak memory is
MLX's peak active memory from after the model is loaded to the end of the loop. The
validation loss is computed afterwards, for both tools, by ``shared_validation_loss``.
"""

import json
import os
import resource
import sys
import time
import types
from functools import partial
from pathlib import Path

import mlxlora  # noqa: F401  (loads OpenBLAS before mlx.core, for both tools)
import mlx.core as mx
import numpy as np

from flops import matmul_peak
from mlxlora.batching import collate, pad_token_id
from mlxlora.config import TrainConfig
from mlxlora.data_formats import read_examples
from mlxlora.dequantized_matmul import use_dequantized_matmul
from mlxlora.loss import masked_loss
from mlxlora.prompt import encode_split

VALID_BATCH_SIZE = 8


def shared_validation_loss(model, tokenizer, valid_path: str, max_seq_length: int) -> float:
    """Return the token-weighted mean loss on completion tokens, the same code for both tools.

    The examples are encoded by mlxlora's prompt code (targets: each completion and its
    end-of-turn token) and scored with full logits, so the result does not depend on either
    tool's loss shortcuts. Quantized layers multiply by their dequantized weights
    (mlxlora.dequantized_matmul): the same values as quantized_matmul up to summation order,
    and many times faster on a CPU.
    """
    use_dequantized_matmul(model)
    config = TrainConfig(max_seq_length=max_seq_length)
    examples = read_examples(Path(valid_path), config.prompt_key, config.completion_key)
    encoded = encode_split(examples, tokenizer, config).examples

    model.eval()
    pad_id = pad_token_id(tokenizer)
    total, count = 0.0, 0.0
    for start in range(0, len(encoded), VALID_BATCH_SIZE):
        batch = collate(encoded[start:start + VALID_BATCH_SIZE], pad_id)
        loss_sum = masked_loss(model, mx.array(batch.inputs), mx.array(batch.targets),
                               mx.array(batch.mask), mx.array(1.0))
        total += loss_sum.item()
        count += float(batch.mask.sum())
    return total / count


class StepClock:
    """Wall-clock starts of every step, the end of the last one, and process CPU time."""

    def __init__(self):
        self.starts: list[float] = []
        self.end: float | None = None
        self.cpu_start: float | None = None
        self.cpu_end: float | None = None

    def start_step(self) -> None:
        self.starts.append(time.perf_counter())
        if self.cpu_start is None:
            self.cpu_start = time.process_time()

    def end_step(self) -> None:
        self.end = time.perf_counter()
        self.cpu_end = time.process_time()

    def loop_seconds(self) -> float:
        return self.end - self.starts[0]

    def loop_cpu_seconds(self) -> float:
        """Return the CPU time of all threads of the process during the loop."""
        return self.cpu_end - self.cpu_start

    def step_seconds(self) -> list[float]:
        """Return the time of each step but the last: from its start to the next start."""
        return list(np.diff(self.starts))


def run_mlx_lm(settings: dict, clock: StepClock) -> dict:
    """Train with mlx-lm's own LoRA path; count the tokens of the batches it draws."""
    import mlx_lm.lora as lora_cli
    from mlx_lm import load
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.datasets import load_dataset
    from mlx_lm.tuner.trainer import iterate_batches

    counts = {"loss_tokens": 0, "nonpad_tokens": 0}

    def timed_batches(*args, **kwargs):
        for batch, lengths in iterate_batches(*args, **kwargs):
            clock.start_step()
            width = batch.shape[1] - 1
            offsets, ends = np.array(lengths)[:, 0], np.array(lengths)[:, 1]
            # mlx-lm's default_loss counts steps 1..width with offset <= step <= length.
            counts["loss_tokens"] += int(np.clip(np.minimum(ends, width) - np.maximum(offsets, 1)
                                                 + 1, 0, None).sum())
            counts["nonpad_tokens"] += int((np.minimum(ends, width + 1) - 1).sum())
            yield batch, lengths

    class EndOfLoop(TrainingCallback):
        def on_train_loss_report(self, info):
            clock.end_step()

    original_train = lora_cli.train

    def train_with_timing(**kwargs):
        return original_train(iterate_batches=timed_batches, **kwargs)

    lora_cli.train = train_with_timing

    args = dict(lora_cli.CONFIG_DEFAULTS)
    args.update(
        model=settings["model"], train=True, data=settings["data"], fine_tune_type="lora",
        optimizer="adam", num_layers=-1, batch_size=settings["batch_size"],
        iters=settings["steps"], learning_rate=settings["learning_rate"],
        steps_per_report=settings["steps"], steps_per_eval=10 ** 9, save_every=10 ** 9,
        max_seq_length=settings["max_seq_length"], mask_prompt=True, seed=settings["seed"],
        adapter_path=settings["adapter_path"], grad_checkpoint=False,
        lora_parameters={"rank": settings["rank"], "dropout": 0.0, "scale": settings["scale"]},
    )
    args = types.SimpleNamespace(**args)

    np.random.seed(args.seed)
    model, tokenizer = load(args.model)
    train_set, _, _ = load_dataset(args, tokenizer)
    mx.reset_peak_memory()
    lora_cli.train_model(args, model, train_set, [], EndOfLoop())
    peak = mx.get_peak_memory()

    return {"model": model, "tokenizer": tokenizer, "peak_memory": peak,
            "loss_tokens": counts["loss_tokens"], "nonpad_tokens": counts["nonpad_tokens"]}


def write_recipe(settings: dict, grad_checkpoint: bool) -> Path:
    scale, rank = settings["scale"], settings["rank"]
    recipe = {
        "model": settings["model"], "data": settings["data"],
        "adapter_path": settings["adapter_path"], "overwrite": True,
        "dtype": "float32", "dequantize": settings["variant"] == "float32",
        "r": rank, "lora_alpha": scale * rank, "lora_dropout": 0.0,
        "target_modules": ["all-linear"], "max_seq_length": settings["max_seq_length"],
        "batch_size": settings["batch_size"], "iters": settings["steps"],
        "learning_rate": settings["learning_rate"], "lr_schedule": "constant",
        "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": None,
        "seed": settings["seed"], "steps_per_report": settings["steps"], "steps_per_eval": 0,
        "save_every": settings["steps"], "grad_checkpoint": grad_checkpoint,
    }
    path = Path(settings["adapter_path"] + ".recipe.yaml")
    path.write_text(json.dumps(recipe, indent=2) + "\n", encoding="utf-8")  # JSON is YAML
    return path


def run_mlxlora(settings: dict, clock: StepClock, grad_checkpoint: bool = False) -> dict:
    """Train with ``mlxlora train``'s code path and a recipe with the shared settings."""
    from mlxlora import trainer
    from mlxlora.config import resolve_config
    from mlxlora.report_log import setup_logging

    captured = {}
    original_prepare = trainer.prepare_session
    original_step = trainer.Trainer.one_step

    def prepare_and_reset_peak(*args, **kwargs):
        session = original_prepare(*args, **kwargs)
        captured["session"] = session
        mx.reset_peak_memory()
        return session

    def timed_step(self, *args, **kwargs):
        clock.start_step()
        result = original_step(self, *args, **kwargs)
        clock.end_step()
        captured["peak"] = mx.get_peak_memory()
        return result

    trainer.prepare_session = prepare_and_reset_peak
    trainer.Trainer.one_step = timed_step

    setup_logging()
    state = trainer.train(resolve_config(str(write_recipe(settings, grad_checkpoint)), {}))
    session = captured["session"]
    examples = session.train_split.examples
    return {"model": session.loaded.model, "tokenizer": session.loaded.tokenizer,
            "peak_memory": captured["peak"], "loss_tokens": state.trained_tokens,
            "nonpad_tokens": sum(len(e.tokens) - 1 for e in examples)}


def main(tool: str, settings_path: str, result_path: str) -> None:
    settings = json.loads(Path(settings_path).read_text(encoding="utf-8"))
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    peak_flops = matmul_peak()
    clock = StepClock()

    runners = {"mlx_lm": run_mlx_lm, "mlxlora": run_mlxlora,
               "mlxlora-checkpoint": partial(run_mlxlora, grad_checkpoint=True)}
    outcome = runners[tool](settings, clock)
    rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    val_loss = shared_validation_loss(outcome["model"], outcome["tokenizer"],
                                      settings["valid"], settings["max_seq_length"])
    steps = clock.step_seconds()
    result = {
        "tool": tool, "variant": settings["variant"], "steps": len(clock.starts),
        "loop_seconds": clock.loop_seconds(), "loop_cpu_seconds": clock.loop_cpu_seconds(),
        "median_step_seconds": float(np.median(steps[1:])) if len(steps) > 1 else None,
        "first_step_seconds": steps[0] if steps else None,
        "step_seconds": steps,
        "peak_memory_bytes": int(outcome["peak_memory"]), "max_rss_bytes": rss_bytes,
        "own_loss_tokens": int(outcome["loss_tokens"]),
        "own_nonpad_tokens": int(outcome["nonpad_tokens"]),
        "val_loss": val_loss, "matmul_peak_flops": peak_flops,
        "load_average": os.getloadavg(),
    }
    Path(result_path).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("mlx_lm", "mlxlora", "mlxlora-checkpoint"):
        sys.exit(__doc__)
    main(*sys.argv[1:])
