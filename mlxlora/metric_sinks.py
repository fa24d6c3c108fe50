"""Optional metric sinks (TensorBoard, Weights & Biases) fed the same records as metrics.jsonl.

A sink's package is imported only when the user asks for it with --report-to, so neither is a
dependency of mlxlora. A missing package is a ConfigError that names the pip package, raised
before the model is loaded.
"""

import importlib
import logging
import math
import os
from pathlib import Path

from mlxlora.errors import ConfigError

logger = logging.getLogger("mlxlora")

TENSORBOARD_DIR = "tensorboard"
WANDB_DEFAULT_PROJECT = "mlxlora"

# For each sink: the modules that provide it, tried in order, and what to pip install.
# torch.utils.tensorboard works only when the tensorboard package is installed as well.
PROVIDERS = {
    "tensorboard": (("tensorboardX", "torch.utils.tensorboard"), "tensorboardX"),
    "wandb": (("wandb",), "wandb"),
}


def is_missing(error: ImportError, module_name: str) -> bool:
    """Return whether an import failed because the module itself (or a parent) is absent."""
    if not isinstance(error, ModuleNotFoundError) or error.name is None:
        return False
    return module_name == error.name or module_name.startswith(error.name + ".")


def import_provider(name: str):
    """Import the module behind a sink; return None when none of its modules is installed.

    A module that is installed but fails to import raises ConfigError with the import
    error, so a broken installation is not reported as a missing package.
    """
    modules, package = PROVIDERS[name]
    broken = None
    for module_name in modules:
        try:
            return importlib.import_module(module_name)
        except ImportError as error:
            if not is_missing(error, module_name) and broken is None:
                broken = f"importing {module_name} failed ({error})"

    if broken:
        raise ConfigError(f"--report-to {name}: {broken}. Repair that installation, or install "
                          f"{package}: pip install --upgrade {package}")
    return None


def check_report_to(names: list[str]) -> None:
    """Raise a ConfigError that lists every unknown sink name and every missing package."""
    problems = []
    for name in names:
        if name not in PROVIDERS:
            problems.append(f"--report-to {name}: unknown metric sink. Use one or more of: "
                            f"{', '.join(PROVIDERS)} (comma-separated).")
        elif import_provider(name) is None:
            package = PROVIDERS[name][1]
            problems.append(f"--report-to {name}: the Python package {package} is not installed. "
                            f"Install it with: pip install {package}")
    if problems:
        raise ConfigError(problems)


def metric_tag(key: str) -> str:
    """Return the chart name of a metrics.jsonl key: val_loss -> val/loss, lr -> train/lr."""
    if key.startswith("val_"):
        return "val/" + key[len("val_"):]
    if key.startswith("train_"):
        return "train/" + key[len("train_"):]
    return "train/" + key


def numeric_values(record: dict) -> dict[str, float]:
    """Return the finite numbers of a record, keyed by chart name, without the step."""
    values = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            values[metric_tag(key)] = value
    return values


class TensorBoardSink:
    """Scalars in RUN_DIR/tensorboard, for `tensorboard --logdir RUN_DIR/tensorboard`."""

    def __init__(self, run_dir: Path, config: dict):
        module = import_provider("tensorboard")
        self.log_dir = Path(run_dir) / TENSORBOARD_DIR
        self.writer = module.SummaryWriter(str(self.log_dir))

    def write(self, record: dict) -> None:
        for tag, value in numeric_values(record).items():
            self.writer.add_scalar(tag, value, record["step"])

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """One Weights & Biases run per training run, named after the run folder.

    The project is $WANDB_PROJECT when set, else "mlxlora". wandb itself reads its other
    settings from the environment (WANDB_MODE=offline, WANDB_ENTITY, WANDB_API_KEY; see
    the environment-variables page of the W&B docs).
    """

    def __init__(self, run_dir: Path, config: dict):
        wandb = import_provider("wandb")
        project = os.environ.get("WANDB_PROJECT", WANDB_DEFAULT_PROJECT)
        self.run = wandb.init(project=project, name=Path(run_dir).name, dir=str(run_dir),
                              config=config)

    def write(self, record: dict) -> None:
        self.run.log(numeric_values(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


SINK_CLASSES = {"tensorboard": TensorBoardSink, "wandb": WandbSink}


class MetricFanout:
    """Send every record to metrics.jsonl and to each optional sink.

    A sink that raises is closed and dropped with one warning: an unreachable W&B server
    must not stop a training run, and metrics.jsonl still contains every record.
    """

    def __init__(self, writer, sinks: dict):
        self.writer = writer
        self.sinks = dict(sinks)

    def write(self, record: dict) -> None:
        self.writer.write(record)
        for name, sink in list(self.sinks.items()):
            try:
                sink.write(record)
            except Exception as error:  # any failure of third-party code; see class docstring
                logger.warning("metric sink %s failed at step %s and is switched off: %s",
                               name, record.get("step"), error)
                self.drop(name)

    def drop(self, name: str) -> None:
        sink = self.sinks.pop(name)
        try:
            sink.close()
        except Exception as error:  # third-party code again; the run's files are complete
            logger.warning("closing metric sink %s failed: %s", name, error)

    def close(self) -> None:
        self.writer.close()
        for name in list(self.sinks):
            self.drop(name)


def open_metric_sinks(writer, names: list[str], run_dir: Path, config: dict) -> MetricFanout:
    """Wrap a MetricsWriter so that its records also reach the sinks named in report_to."""
    check_report_to(names)
    sinks = {}
    for name in dict.fromkeys(names):
        sinks[name] = SINK_CLASSES[name](run_dir, config)
        logger.info("metrics also go to %s", name)
    return MetricFanout(writer, sinks)
