"""A catalogue of bad inputs: each gives its own message through the CLI, never a traceback.

Every case runs `mlxlora ...` in this process through mlxlora.cli.main, the console entry
point, and checks the exit status (2) and the message on stderr. docs/reliability.md lists
the same cases with their messages.
"""

import contextlib
import io
import json
import logging
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import mlxlora  # noqa: F401  (loads OpenBLAS before mlx.core)
import pytest

from kill_stress import make_workspace
from mlxlora.cli import main
from mlxlora.config import resolve_config
from mlxlora.testing.tiny import make_model, save_model_folder
from mlxlora.trainer import train

GOOD_ROW = '{"prompt": "alpha beta", "completion": "gamma"}'


@dataclass
class Case:
    """One bad input: files to write under the case folder, CLI arguments and the message.

    Arguments may contain {case} (the case folder), {model} (the tiny model), {other_model}
    (a model with other weights) and {run} (a finished run folder). ``train`` cases get
    --model, --data and --adapter-path defaults unless they pass their own.
    """

    name: str
    args: list[str]
    expected: str
    files: dict[str, str | bytes] = field(default_factory=dict)
    # "truncate adapters" or "damage states": copy the finished run to {case}/run and break it.
    prepare: str | None = None


def data(*lines: str) -> dict[str, str]:
    return {"data/train.jsonl": "".join(line + "\n" for line in lines)}


CASES = [
    # Malformed JSONL.
    Case("invalid JSON line", ["train"], "train.jsonl:2: invalid JSON",
         data(GOOD_ROW, '{"prompt": "a", "completion": }')),
    Case("last line cut short", ["train"], "train.jsonl:2: invalid JSON",
         {"data/train.jsonl": GOOD_ROW + '\n{"prompt": "a", "compl'}),
    Case("line is a JSON array", ["train"], "train.jsonl:1: expected a JSON object",
         data('["alpha", "beta"]')),
    Case("unknown keys", ["train"], "train.jsonl:1: no known key (found: answer, question)",
         data('{"question": "a", "answer": "b"}')),
    Case("value of the wrong type", ["train"], "train.jsonl:1: \"prompt\" must be a string",
         data('{"prompt": 1, "completion": "b"}')),
    Case("formats mixed in one file", ["train"],
         "train.jsonl:2: this line is in completions format but the first example",
         data('{"text": "alpha"}', GOOD_ROW)),
    Case("empty data file", ["train"], "train.jsonl: the file is empty", {"data/train.jsonl": ""}),
    Case("blank lines only", ["train"], "train.jsonl: the file is empty",
         {"data/train.jsonl": "\n\n\n"}),
    Case("unknown chat role", ["train"], "train.jsonl:1: message 0: unknown role 'narrator'",
         data('{"messages": [{"role": "narrator", "content": "hi"}, '
              '{"role": "assistant", "content": "ok"}]}')),
    Case("empty messages list", ["train"], 'train.jsonl:1: "messages" is empty',
         data('{"messages": []}')),
    Case("not UTF-8", ["train"], "train.jsonl: not valid UTF-8",
         {"data/train.jsonl": b"\xff\xfe\x00bad\n"}),
    # Data paths.
    Case("data folder missing", ["train", "--data", "{case}/nothing"], "--data {case}/nothing: not found"),
    Case("data folder without train.jsonl", ["train"], "train.jsonl not found in this folder",
         {"data/valid.jsonl": GOOD_ROW + "\n"}),
    Case("data file not .jsonl", ["train", "--data", "{case}/rows.csv"], "not a .jsonl file",
         {"rows.csv": "a,b\n"}),
    # Recipes and options.
    Case("misspelt recipe key", ["train", "--recipe", "{case}/recipe.yaml"],
         "unknown key 'learning_rat'; did you mean 'learning_rate'?",
         {"recipe.yaml": "learning_rat: 1e-4\n"}),
    Case("invalid YAML", ["train", "--recipe", "{case}/recipe.yaml"], "recipe.yaml:3: invalid YAML",
         {"recipe.yaml": "r: 8\nlayers: [1, 2\n"}),
    Case("recipe is a list", ["train", "--recipe", "{case}/recipe.yaml"],
         "a recipe must be a mapping of keys to values", {"recipe.yaml": "- r\n- 8\n"}),
    Case("recipe file missing", ["train", "--recipe", "{case}/none.yaml"], "none.yaml: file not found"),
    Case("recipe value of the wrong type", ["train", "--recipe", "{case}/recipe.yaml"],
         "r must be int, got 'eight'", {"recipe.yaml": "r: eight\n"}),
    Case("flag value of the wrong type", ["train", "--rank", "abc"],
         "Invalid value for '--rank': 'abc' is not a valid integer"),
    Case("values out of range", ["train", "--lora-dropout", "1.5", "--batch-size", "0"],
         "batch_size must be at least 1, got 0"),
    Case("invalid choice", ["train", "--lr-schedule", "steep"],
         "Invalid value for '--lr-schedule': 'steep' is not one of"),
    Case("misspelt flag", ["train", "--learning-rat", "1e-4"], "No such option '--learning-rat'. Did you mean '--learning-rate'?"),
    # Models.
    Case("model folder missing", ["train", "--model", "{case}/no-model"],
         "no such file or folder, and not a Hub repo id. Accepted forms:"),
    Case("model folder without config.json", ["train", "--model", "{case}/empty"],
         "has no config.json", {"empty/.keep": ""}),
    Case("model file not GGUF", ["train", "--model", "{case}/weights.bin"],
         "this is a file but not a .gguf file", {"weights.bin": "\0\0"}),
    # Output folders, resume and adapters.
    Case("output path is a file", ["train", "--adapter-path", "{case}/out.txt"],
         "--adapter-path {case}/out.txt is a file; pass a folder", {"out.txt": "x"}),
    Case("output folder has a finished run", ["train", "--adapter-path", "{run}"],
         "already contains a finished run"),
    Case("resume folder missing", ["train", "--resume", "{case}/nothing"],
         "--resume {case}/nothing: not found"),
    Case("resume folder without checkpoints", ["train", "--resume", "{case}/empty"],
         "no checkpoint found", {"empty/.keep": ""}),
    Case("resume with another rank", ["train", "--resume", "{run}", "--rank", "4"],
         "--rank 4: the checkpoint has 8"),
    Case("resume on another base model", ["train", "--resume", "{run}", "--model", "{other_model}"],
         "its weights differ (same architecture, another checkpoint)"),
    Case("checkpoint cut short", ["train", "--resume", "{case}/run/checkpoints/step-0000002"],
         "the checkpoint is incomplete:\n  - --resume {case}/run/checkpoints/step-0000002: adapters.safetensors:", prepare="truncate adapters"),
    Case("every checkpoint damaged", ["train", "--resume", "{case}/run"],
         "--resume {case}/run: all 2 checkpoints are incomplete", prepare="damage states"),
    Case("adapter used with another base model",
         ["generate", "--model", "{other_model}", "--adapter-path", "{run}", "--prompt", "hi"],
         "was trained on base model"),
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """The tiny model, a model with other weights, and a finished 2-step run."""
    root = tmp_path_factory.mktemp("bad-inputs")
    make_workspace(root)
    other = make_model()
    other.model.embed_tokens.weight = other.model.embed_tokens.weight * 3
    save_model_folder(root / "other-model", model=other)
    train(resolve_config(flags={"model": str(root / "model"), "data": str(root / "data"),
                                "adapter_path": str(root / "run"), "iters": 2,
                                "batch_size": 2, "save_every": 1}))
    return {"model": root / "model", "other_model": root / "other-model", "run": root / "run"}


def write_files(folder: Path, files: dict[str, str | bytes]) -> None:
    for name, content in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)


def case_arguments(case: Case, folder: Path, assets: dict[str, Path]) -> list[str]:
    values = {"case": str(folder), **{k: str(v) for k, v in assets.items()}}
    args = [arg.format(**values) for arg in case.args]
    if args[0] != "train":
        return args
    defaults = {"--model": values["model"], "--data": f"{folder}/data",
                "--adapter-path": f"{folder}/out", "--iters": "1", "--batch-size": "2"}
    for flag, value in defaults.items():
        if flag not in args and not (flag != "--adapter-path" and "--resume" in args):
            args += [flag, value]
    return args


@contextlib.contextmanager
def fresh_logger():
    """Let the CLI set up the mlxlora logger, then restore it for the other tests."""
    logger = logging.getLogger("mlxlora")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    logger.handlers = []
    try:
        yield
    finally:
        logger.handlers, logger.propagate, logger.level = saved[0], saved[1], saved[2]


def run_cli(args: list[str]) -> tuple[int, str]:
    """Run `mlxlora ARGS` in this process; return the exit status and stderr."""
    stderr = io.StringIO()
    argv = sys.argv
    sys.argv = ["mlxlora", *args]
    try:
        with fresh_logger(), contextlib.redirect_stderr(stderr):
            try:
                main()
                status = 0
            except SystemExit as exit_:
                status = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = argv
    return status, stderr.getvalue()


def damage_run_copy(how: str, folder: Path, run: Path) -> None:
    """Copy the finished run into ``folder`` and damage its checkpoints as a bad disk would."""
    copy = folder / "run"
    shutil.copytree(run, copy)
    checkpoints = sorted((copy / "checkpoints").glob("step-*"))
    if how == "truncate adapters":
        weights = checkpoints[-1] / "adapters.safetensors"
        weights.write_bytes(weights.read_bytes()[:-64])
    elif how == "damage states":
        for checkpoint in checkpoints:
            (checkpoint / "state.json").write_text('{"step": ')
    else:
        raise ValueError(f"unknown damage {how!r}")


def run_case(case: Case, folder: Path, assets: dict[str, Path]) -> tuple[int, str, list[str]]:
    folder.mkdir(parents=True, exist_ok=True)
    write_files(folder, case.files)
    if case.prepare:
        damage_run_copy(case.prepare, folder, assets["run"])
    if "data/train.jsonl" not in case.files and "data/valid.jsonl" not in case.files:
        write_files(folder, data(GOOD_ROW, GOOD_ROW))
    args = case_arguments(case, folder, assets)
    status, stderr = run_cli(args)
    return status, stderr, args


@pytest.mark.parametrize("case", CASES, ids=[case.name.replace(" ", "-") for case in CASES])
def test_bad_input_message(case, assets, tmp_path):
    run_before = sorted(p.name for p in assets["run"].iterdir())

    status, stderr, _ = run_case(case, tmp_path / "case", assets)

    expected = case.expected.format(case=tmp_path / "case", **assets)
    assert "Traceback" not in stderr
    assert status == 2, stderr
    assert expected in stderr
    assert sorted(p.name for p in assets["run"].iterdir()) == run_before

