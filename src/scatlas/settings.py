"""Settings schemas shared by every workflow: preprocessing, splits, training; one error format.

These are floor-1 pieces: the AnnData-level tools (:mod:`scatlas.tl`), the experiment runner and
the CLI all validate their settings with them. Importing this module loads pydantic only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from scatlas._errors import ConfigError

if TYPE_CHECKING:
    from scatlas.train import TrainConfig

S = TypeVar("S", bound=BaseModel)


class Strict(BaseModel):
    """A schema that refuses unknown fields."""

    model_config = ConfigDict(extra="forbid")


class PreprocessConfig(Strict):
    """Preprocessing (fitted on each split's training cells)."""

    n_top_genes: int | None = Field(2000, ge=1)
    scale: Literal["none", "maxabs", "standard"] = "none"


class SplitConfig(Strict):
    """How cells are split: ``kfold`` (stratified by batch × label), ``donor`` or ``study`` held out."""

    kind: Literal["kfold", "donor", "study"] = "kfold"
    n_splits: int = Field(5, ge=3)
    group_key: str | None = None
    val_fraction: float = Field(0.2, gt=0, lt=1)
    seed: int = 0


class TrainingConfig(Strict):
    """Trainer settings shared by the neural models (see :class:`scatlas.train.TrainConfig`)."""

    max_epochs: int = Field(100, ge=1)
    batch_size: int = Field(256, ge=2)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    lr_decay: float | None = Field(None, gt=0, le=1)
    gradient_clip: float | None = Field(None, gt=0)
    patience: int = Field(10, ge=0)
    accelerator: str = "auto"
    devices: int | str = "auto"
    strategy: str = "auto"
    num_nodes: int = Field(1, ge=1)
    ddp_timeout_minutes: float = Field(180.0, gt=0)
    chunk_size: int | None = Field(None, ge=1)
    checkpoint_interval_s: float = Field(60.0, ge=0)
    keep_checkpoints: bool = False
    restore_best: bool = False

    def to_train_config(self, seed: int, progress: bool, **extra: Any) -> TrainConfig:
        """The engine's dataclass (``extra``: engine fields such as ``monitor``), knowing which fields the user set."""
        from scatlas.train import TrainConfig  # torch and Lightning load only when training

        return TrainConfig(**self.model_dump(), seed=seed, progress=progress, explicit=frozenset(self.model_fields_set), **extra)


def format_errors(exc: ValidationError) -> str:
    """Every error of a pydantic validation on one line (`field: message; ...`; a check across fields: its message alone)."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {_message(e)}" if e["loc"] else _message(e) for e in exc.errors())


def _message(error: Any) -> str:
    """The error's message; a validator's own ``ValueError`` without pydantic's "Value error, " prefix."""
    raised = error.get("ctx", {}).get("error") if error["type"] == "value_error" else None
    return str(raised) if raised is not None else error["msg"]


def parse_settings(schema: type[S], values: dict[str, Any], where: str = "") -> S:
    """Validate ``values`` against a pydantic ``schema``; errors become one :class:`ConfigError` line."""
    try:
        return schema.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(f"{where}{format_errors(exc)}") from exc


