"""Experiment trackers (`train.log_with`) through Accelerate's tracking API.

The names are Accelerate's (tensorboard, wandb, mlflow, comet_ml, aim, clearml, dvclive, swanlab,
trackio). Accelerate skips a tracker whose package is missing with only a debug message, so a
run asking for one is refused here instead, before anything is written, naming the package to
install. Each tracker gets the effective config as hyper-parameters and every metrics.jsonl row
(same names, at the row's step); local trackers write under RUN/logs/.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmcli.config import Config
from llmcli.errors import UserError

LOGS_DIR = "logs"
# Accelerate's tracker name -> the package that provides it (what to pip install).
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet-ml",
            "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab", "trackio": "trackio"}


def check_trackers(names: list[str]) -> list[str]:
    """`names` without repeats; a UserError for an unknown tracker or one that is not installed."""
    from accelerate.tracking import get_available_trackers

    available = {str(t) for t in get_available_trackers()}
    for name in names:
        if name not in PACKAGES:
            raise UserError(f"train.log_with: unknown tracker {name!r} (known: {', '.join(PACKAGES)})")
        if name not in available:
            raise UserError(f"train.log_with: {name} is not installed; pip install {PACKAGES[name]} "
                            "(or leave it out of train.log_with)")
    return list(dict.fromkeys(names))


class Trackers:
    """The run's trackers: set up with the Accelerator, started once the run's config is known,
    fed every metrics row, closed at the end. With no names, all of it does nothing."""

    def __init__(self, names: list[str]):
        self.names = check_trackers(names)

    def accelerator_kwargs(self, run_dir: Path) -> dict[str, Any]:
        """What `Accelerator(...)` needs to create them (nothing when there are none)."""
        if not self.names:
            return {}
        from accelerate.utils import ProjectConfiguration

        return {"log_with": self.names,
                "project_config": ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / LOGS_DIR))}

    def start(self, accelerator: Any, cfg: Config, run_name: str, resumed_at: int | None) -> None:
        """init_trackers with the config as hyper-parameters. A resumed TensorBoard log drops
        the events after the checkpoint it resumes from (they are logged again)."""
        if not self.names:
            return
        kwargs: dict[str, dict[str, Any]] = {"wandb": {"name": run_name}, "mlflow": {"run_name": run_name}}
        if resumed_at is not None:
            kwargs["tensorboard"] = {"purge_step": resumed_at + 1}
        accelerator.init_trackers(run_name, config=hyperparameters(cfg),
                                  init_kwargs={k: v for k, v in kwargs.items() if k in self.names})

    def log(self, accelerator: Any, row: dict[str, Any]) -> None:
        """One metrics row: its numbers under their own names, at its step."""
        if self.names:
            values = {k: v for k, v in row.items() if k != "step" and _number(v)}
            accelerator.log(values, step=row["step"])

    def finish(self, accelerator: Any) -> None:
        """Flush and close every tracker (the process group stays, unlike end_training)."""
        for tracker in getattr(accelerator, "trackers", []) if self.names else []:
            tracker.finish()


def hyperparameters(cfg: Config) -> dict[str, bool | int | float | str]:
    """The config flattened to dotted scalars (`train.lora.r`; lists and nulls as text), as
    trackers take it."""
    flat: dict[str, bool | int | float | str] = {}

    def walk(prefix: str, values: dict[str, Any]) -> None:
        for key, value in values.items():
            if isinstance(value, dict):
                walk(f"{prefix}{key}.", value)
            else:
                flat[prefix + key] = value if isinstance(value, (bool, int, float, str)) else str(value)

    walk("", cfg.to_dict())
    return flat


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
