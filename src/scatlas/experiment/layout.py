"""The output layout (DESIGN §5), compatible with the scMEDAL convention."""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    """Paths of one model's run.

    ``<root>/<dataset>_outputs/{latent_space,figures,saved_models}/<scenario>/<model>/<run>``
    """

    root: Path
    dataset: str
    scenario: str
    model: str
    run: str

    def _tree(self, kind: str) -> Path:
        return self.root / f"{self.dataset}_outputs" / kind / self.scenario / self.model / self.run

    @property
    def latent_dir(self) -> Path:
        """Latents, reconstructions, scores and histories."""
        return self._tree("latent_space")

    @property
    def figures_dir(self) -> Path:
        """Figures."""
        return self._tree("figures")

    @property
    def models_dir(self) -> Path:
        """Config, checkpoints and model parameters."""
        return self._tree("saved_models")

    @property
    def run_dirs(self) -> tuple[Path, Path, Path]:
        """The three trees of this run."""
        return self.latent_dir, self.figures_dir, self.models_dir

    def split_dir(self, number: int) -> Path:
        """Finished outputs of split ``number`` (its existence marks the split as done)."""
        return self.latent_dir / f"splits_{number}"

    def staging_dir(self, number: int) -> Path:
        """Where split ``number`` is written before being renamed to :meth:`split_dir`."""
        return self.latent_dir / f".splits_{number}.partial"

    def checkpoint_dir(self, number: int) -> Path:
        """Lightning checkpoints of split ``number``."""
        return self.models_dir / f"splits_{number}" / "checkpoints"

    def split_done(self, number: int) -> bool:
        """Whether split ``number`` finished in an earlier invocation."""
        return self.split_dir(number).is_dir()

    def finished_splits(self) -> list[int]:
        """Numbers of the finished splits."""
        if not self.latent_dir.is_dir():
            return []
        return sorted(int(p.name.split("_")[1]) for p in self.latent_dir.glob("splits_*") if p.is_dir())

    def publish(self, number: int) -> Path:
        """Atomically rename the staging directory of split ``number`` to its final name."""
        final = self.split_dir(number)
        if final.exists():
            shutil.rmtree(final)
        os.replace(self.staging_dir(number), final)
        return final


def compare_dir(root: Path, dataset: str, scenario: str, run: str) -> Path:
    """``<root>/<dataset>_outputs/compare_models/<scenario>/<run>``."""
    return root / f"{dataset}_outputs" / "compare_models" / scenario / run


def safe_name(value: str) -> str:
    """``value`` as a file-name part: every character outside letters, digits, ``.``, ``-`` and ``_`` replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(value))
