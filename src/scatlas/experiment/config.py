"""Experiment configuration: a YAML file validated by a pydantic schema.

Example (``examples/cellbench_5cl.yaml``)::

    dataset:
      name: cellbench_5cl
      path: ../shared/data/cellbench_5cl_celseq2_3plates.h5ad
      batch_key: batch
      label_key: cell_line
      filter: {demuxlet_cls: [SNG]}
    preprocess: {n_top_genes: 2000}
    split: {kind: kfold, n_splits: 3}
    training: {max_epochs: 60, batch_size: 128}
    models:
      - {type: pca}
      - {type: ae}
      - {type: aec}
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from scatlas._errors import ConfigError
from scatlas.data.dataset import DatasetConfig
from scatlas.models.base import REGISTRY, LatentClassifier, ModelConfig, validate_entry
from scatlas.settings import PreprocessConfig, SplitConfig, TrainingConfig, distinct, format_errors, Seed, Strict, unknown_settings


class EvaluationConfig(Strict):
    """What is written and scored for every split."""

    sample_size: int = Field(10_000, ge=10)
    parts: Annotated[list[Literal["train", "val", "test"]], distinct("each part at most once")] = Field(default_factory=lambda: ["train", "val", "test"],
                                                                                                          min_length=1)
    save_recon: bool = True
    figures: bool = True


class OutputConfig(Strict):
    """Where results go: ``<dir>/<dataset>_outputs/latent_space/<scenario>/<model>/<run>``."""

    dir: Path = Path("outputs")
    scenario: str | None = None
    run: str = "run1"


class ExperimentConfig(Strict):
    """A whole experiment: data, preprocessing, splits, training, models, evaluation, outputs."""

    dataset: DatasetConfig
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    models: list[ModelConfig]
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    seed: Seed = 0

    @field_validator("models", mode="before")
    @classmethod
    def _parse_models(cls, value: Any) -> list[ModelConfig]:
        if not isinstance(value, list) or not value:
            raise ValueError(f"give a non-empty list of models (available types: {sorted(REGISTRY)})")
        return [v if isinstance(v, ModelConfig) else validate_entry(v) for v in value]  # its ValueError: pydantic adds "models: "

    @model_validator(mode="after")
    def _check(self) -> ExperimentConfig:
        names = [self.model_name(m) for m in self.models]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"models: names must be unique, repeated: {duplicated} (set `name:`)")
        for i, m in enumerate(self.models):
            unknown = sorted(set(m.training) - set(TrainingConfig.model_fields))
            if unknown:
                raise ValueError(f"models: {self.model_name(m)}: training: {unknown_settings(unknown, list(TrainingConfig.model_fields))}")
            cls = REGISTRY[m.type]
            if issubclass(cls, LatentClassifier):
                earlier = names[:i]
                missing = [s for s in cls.sources(m) if not s.startswith("obsm:") and s not in earlier]
                if missing:
                    raise ValueError(f"models: {self.model_name(m)} reads latents of {missing}, which must be models listed before it (have {earlier})")
        needing = [self.model_name(m) for m in self.models if REGISTRY[m.type].needs_labels]
        if needing and self.dataset.label_key is None:
            raise ValueError(f"models {needing} need labels: set dataset.label_key")
        return self

    @staticmethod
    def model_name(model: ModelConfig) -> str:
        """Directory name of a model in the layout (``name`` or the type in upper case)."""
        return model.name or model.type.upper()

    @property
    def scenario(self) -> str:
        """Scenario directory (default: the split kind)."""
        return self.output.scenario or self.split.kind

    @property
    def group_key(self) -> str | None:
        """Column defining donors / studies for group splits (default: the batch key)."""
        return self.split.group_key or self.dataset.batch_key


def load_config(path: str | Path) -> ExperimentConfig:
    """Read and validate an experiment YAML file.

    A relative ``dataset.path`` is taken from the working directory; if no file is
    there, from the config file's directory.

    Raises
    ------
    ConfigError
        Naming the file and every invalid field.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({' '.join(str(exc).split())})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with dataset, models, ...")
    try:
        config = ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {format_errors(exc, ExperimentConfig)}") from exc
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    data_path = config.dataset.path
    if not data_path.is_absolute() and not data_path.exists() and (path.parent / data_path).exists():
        config.dataset.path = path.parent / data_path
    return config
