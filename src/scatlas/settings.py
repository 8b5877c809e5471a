"""Settings schemas shared by every workflow: preprocessing, splits, training; one error format.

These are floor-1 pieces: the AnnData-level tools (:mod:`scatlas.tl`), the experiment runner and
the CLI all validate their settings with them. Importing this module loads pydantic only.
"""

from __future__ import annotations

import typing
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from scatlas._describe import closest
from scatlas._errors import ConfigError

if TYPE_CHECKING:
    from scatlas.train import TrainConfig

S = TypeVar("S", bound=BaseModel)

#: A random seed: numpy, torch and Lightning take 0 to 2**32 - 1.
Seed = Annotated[int, Field(ge=0, lt=2**32)]


def distinct(say: str) -> AfterValidator:
    """A list field's check that no item repeats: ``Annotated[list[...], distinct("each part once")]`` (``"<items>: <say>"`` otherwise)."""
    def check(values: list[Any]) -> list[Any]:
        if len(set(values)) < len(values):
            raise ValueError(f"{values}: {say}")
        return values

    return AfterValidator(check)


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
    seed: Seed = 0


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

    #: Settings of training by epochs, which a model fitted without them (scikit-learn's PCA and NMF, the full-batch linear classifier) does not use.
    EPOCH_FIELDS: ClassVar[frozenset[str]] = frozenset({"max_epochs", "batch_size", "lr", "weight_decay", "lr_decay", "gradient_clip", "patience"})

    def epochs_set(self) -> list[str]:
        """The epoch settings (:attr:`EPOCH_FIELDS`) the user set, sorted: a model fitted without epochs says that they do not apply."""
        return sorted(self.EPOCH_FIELDS & self.model_fields_set)

    def chunk_size_unused(self, name: str, in_memory: bool) -> str | None:
        """The line saying that a chunk size the user set does not apply to a matrix ``in_memory`` (``None`` otherwise)."""
        if not in_memory or self.chunk_size is None or "chunk_size" not in self.model_fields_set:
            return None
        return f"{name}: chunk_size does not apply (the matrix is in memory, not streamed: --stream, or a backed AnnData)"

    def to_train_config(self, seed: int, progress: bool, **extra: Any) -> TrainConfig:
        """The engine's dataclass (``extra``: engine fields such as ``monitor``), knowing which fields the user set."""
        from scatlas.train import TrainConfig  # torch and Lightning load only when training

        return TrainConfig(**self.model_dump(), seed=seed, progress=progress, explicit=frozenset(self.model_fields_set), **extra)


def format_errors(exc: ValidationError, schema: type[BaseModel] | None = None) -> str:
    """Every error of a pydantic validation on one line (`field: message; ...`; a check across fields: its message alone).

    With the ``schema`` validated, an unknown field names the closest known one (or lists them).
    """
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {_message(e, schema)}" if e["loc"] else _message(e, schema) for e in exc.errors())


def _message(error: Any, schema: type[BaseModel] | None) -> str:
    """The error's message; a validator's own ``ValueError`` without pydantic's "Value error, " prefix; for an unknown field, the known ones."""
    if error["type"] == "extra_forbidden" and schema is not None:
        known = _fields_at(schema, error["loc"][:-1])
        if known:
            return unknown_setting(str(error["loc"][-1]), known)
    raised = error.get("ctx", {}).get("error") if error["type"] == "value_error" else None
    return str(raised) if raised is not None else error["msg"]


#: Names other libraries give our settings (scikit-learn, scanpy, scvi-tools), tried before spelling in :func:`unknown_setting`.
SYNONYMS = {"n_components": ("rank", "latent_dim"), "n_comps": ("n_components", "rank", "latent_dim"), "n_latent": ("latent_dim", "rank"),
            "n_epochs": ("max_epochs",), "epochs": ("max_epochs",), "learning_rate": ("lr",), "dropout_rate": ("dropout",),
            "n_hidden": ("hidden",), "n_layers": ("hidden",), "early_stopping_patience": ("patience",), "random_state": ("seed", "seeds")}


#: What a suggested setting takes, where another library's name for it takes something else (``n_layers=2``: a count).
TAKES = {"hidden": "the hidden layers' widths, e.g. [128, 128]"}


def unknown_setting(name: str, known: Sequence[str]) -> str:
    """What to say of a setting none of ``known`` matches: the known name another library calls ``name``
    (:data:`SYNONYMS`, with what it takes: :data:`TAKES`), else the closest known name, or all of them."""
    close = next((s for s in SYNONYMS.get(name, ()) if s in known), None) or closest(name, known)
    if not close:
        return f"unknown setting; known: {', '.join(known)}"
    return f"unknown setting; did you mean {close!r}{f' ({TAKES[close]})' if close in TAKES else ''}?"


def unknown_settings(names: Iterable[str], known: Sequence[str]) -> str:
    """``name: unknown setting; did you mean ...`` (:func:`unknown_setting`) for each of ``names``, joined by ``'; '``."""
    return "; ".join(f"{name}: {unknown_setting(name, known)}" for name in names)


def check_keywords(given: Iterable[str], known: Sequence[str], where: str = "") -> None:
    """Refuse keyword settings that a function passes on to several schemas (``known``: all their fields) in one :class:`ConfigError` line."""
    unknown = [name for name in given if name not in known]
    if unknown:
        raise ConfigError(where + unknown_settings(unknown, known))


def _fields_at(schema: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """The fields of the schema that ``loc`` leads to within ``schema`` (list positions skipped), or ``None``."""
    model: Any = schema
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        nested = None if field is None else next((t for t in (field.annotation, *_arguments(field.annotation)) if _is_schema(t)), None)
        if nested is None:
            return None
        model = nested
    return list(model.model_fields)


def _arguments(annotation: Any) -> list[Any]:
    """Every type inside ``annotation`` (``list[X] | None`` → ``list[X]``, ``X``, ``None``)."""
    found = []
    for argument in typing.get_args(annotation):
        found += [argument, *_arguments(argument)]
    return found


def _is_schema(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def parse_settings(schema: type[S], values: dict[str, Any], where: str = "") -> S:
    """Validate ``values`` against a pydantic ``schema``; errors become one :class:`ConfigError` line."""
    try:
        return schema.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(f"{where}{format_errors(exc, schema)}") from exc


