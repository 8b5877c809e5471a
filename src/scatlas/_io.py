"""Atomic writers: every output is written to a temporary path and renamed into place."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()

OUTPUT_MARK = ".scatlas_output"
"""Written into every output directory :func:`staged_dir` creates: ``--overwrite`` replaces only a directory that holds it."""


def check_writable(path: str | os.PathLike[str], suffix: str | None = None) -> Path:
    """Refuse an output path before any work: a directory (``suffix=None``) or a file ending in ``suffix``.

    Raises
    ------
    ConfigError
        When the path (for a directory) or one of its parents is an existing file, the nearest
        existing parent is not writable, a file output is an existing directory, or its name
        does not end in ``suffix``.
    """
    from scatlas._errors import ConfigError

    path = Path(path)
    if suffix is not None and path.suffix != suffix:
        raise ConfigError(f"{path}: the output must be a {suffix} file name")
    if path.exists() and path.is_dir() != (suffix is None):
        raise ConfigError(f"{path}: exists and is a {'directory' if path.is_dir() else 'file'}; give a {'file name' if suffix else 'directory'}")
    existing = path if suffix is None else path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{path}: cannot be created, {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{path}: no permission to write in {existing}")
    return path


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    On failure the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path = check_writable(path, path.suffix) if path.suffix else path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the permissions open() would
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _write(path: str | os.PathLike[str], writer: Callable[[Path], Any]) -> Path:
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def write_csv(df: pd.DataFrame, path: str | os.PathLike[str], index: bool = False) -> Path:
    """Write ``df`` as CSV atomically."""
    return _write(path, lambda tmp: df.to_csv(tmp, index=index))


def write_parquet(df: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write ``df`` as parquet atomically."""
    return _write(path, lambda tmp: df.to_parquet(tmp, index=False))


class ChunkedTable:
    """Append DataFrame chunks to one ``.csv`` or ``.parquet`` file, for outputs too large to hold at once.

    Meant for a staged output directory (:func:`staged_dir`), which makes the whole directory
    appear at once; the file itself is written in place. Chunks must share their columns.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._parquet: Any = None
        self._started = False

    def write(self, df: pd.DataFrame) -> None:
        """Append ``df`` (the first chunk also writes the CSV header / parquet schema)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pandas(df, preserve_index=False)
            if self._parquet is None:
                self._parquet = pq.ParquetWriter(self.path, table.schema)
            self._parquet.write_table(table)
        else:
            df.to_csv(self.path, mode="a" if self._started else "w", header=not self._started, index=False)
        self._started = True

    def close(self) -> None:
        """Finish the file (a parquet footer)."""
        if self._parquet is not None:
            self._parquet.close()
            self._parquet = None

    def __enter__(self) -> ChunkedTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_npy(array: np.ndarray, path: str | os.PathLike[str]) -> Path:
    """Write ``array`` as ``.npy`` atomically (``np.save`` would append a suffix to the temp name)."""

    def _save(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, np.asarray(array))

    return _write(path, _save)


def write_torch(state: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` ``state`` (e.g. a ``state_dict``) to ``path`` atomically, the same weights always giving the same bytes.

    Saved through a file object: given a path, ``torch.save`` names the archive's inner folder
    after the (here temporary, randomly named) file, so identical weights gave different files.
    """
    import torch  # here, not at the top: reading configs and writing tables needs no torch

    def _save(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            torch.save(state, fh)

    return _write(path, _save)


def write_yaml(data: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``data`` as YAML atomically."""

    def _dump(tmp: Path) -> None:
        with open(tmp, "w") as fh:
            yaml.safe_dump(data, fh, sort_keys=False)

    return _write(path, _dump)


def write_text(text: str, path: str | os.PathLike[str]) -> Path:
    """Write ``text`` atomically."""
    return _write(path, lambda tmp: Path(tmp).write_text(text))


def save_figure(fig: Any, path: str | os.PathLike[str], dpi: int = 120) -> Path:
    """Save a matplotlib figure atomically and close it."""
    import matplotlib.pyplot as plt

    suffix = Path(path).suffix.lstrip(".") or "png"
    try:
        return _write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=suffix, bbox_inches="tight"))
    finally:
        plt.close(fig)


def check_output_dir(out: str | os.PathLike[str], overwrite: bool = False, inputs: tuple[str | os.PathLike[str], ...] = ()) -> Path:
    """Refuse an output directory that cannot be written (:func:`check_writable`) or holds files, unless ``overwrite``
    and scatlas wrote it (it holds :data:`OUTPUT_MARK`) and it holds none of the command's ``inputs``: the directory is
    then replaced whole, so ``--overwrite`` never deletes a folder of the user's (``--out .``, or the folder holding the
    input data) nor an input file put into an earlier output.

    Called before any work by every command that writes a directory, and again by :func:`staged_dir`.
    """
    from scatlas._errors import ConfigError

    out = check_writable(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"{out}: output directory exists and is not empty (pass --overwrite; overwrite=True in Python)")
        if not (out / OUTPUT_MARK).exists():
            raise ConfigError(f"{out}: not a directory scatlas wrote (no {OUTPUT_MARK} in it), and --overwrite would delete everything in it: "
                              "give a new output directory, or empty this one yourself")
        held = [p for p in inputs if Path(p).exists() and Path(p).resolve().is_relative_to(out.resolve())]
        if held:
            raise ConfigError(f"{out}: holds the input {held[0]}, and --overwrite would delete it with the rest of the directory: "
                              "give a new output directory, or move the input out of it")
    if Path.cwd().is_relative_to(out.resolve()):
        raise ConfigError(f"{out}: is the current directory or holds it, and an output directory is written elsewhere and moved into "
                          "place whole: give a new folder name (e.g. --out results)")
    return out


def check_output_file(out: str | os.PathLike[str], suffix: str, overwrite: bool = False, inputs: tuple[str | os.PathLike[str], ...] = ()) -> Path:
    """Refuse an output file that cannot be written (:func:`check_writable`), is one of the command's ``inputs`` (it
    would replace the data read), or exists, unless ``overwrite``. Called before any work."""
    from scatlas._errors import ConfigError

    out = check_writable(out, suffix)
    if any(Path(p).exists() and out.resolve() == Path(p).resolve() for p in inputs):
        raise ConfigError(f"{out}: is the input file; write the results to another file (this one would be replaced)")
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} exists (pass --overwrite; overwrite=True in Python)")
    return out


@contextmanager
def staged_dir(out: str | os.PathLike[str], overwrite: bool = False, inputs: tuple[str | os.PathLike[str], ...] = ()) -> Iterator[Path]:
    """Yield a temporary sibling directory of ``out``; rename it to ``out`` when the block succeeds.

    An existing non-empty ``out`` is an error unless ``overwrite`` (:func:`check_output_dir`, with
    the command's ``inputs``). On failure the temporary directory is removed and ``out`` is untouched.
    """
    import shutil

    out = check_output_dir(out, overwrite, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield stage
        (stage / OUTPUT_MARK).write_text("written by scatlas; `--overwrite` may replace this directory\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(stage, out)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def checkpoints_beside(out: str | os.PathLike[str]) -> Path:
    """The training-checkpoint directory of a command writing ``out``: ``<name>_checkpoints`` beside it (without an ``.h5ad`` suffix)."""
    out = Path(out)
    if out.name in ("", ".."):  # `--out .` or `--out ..`: name the folder itself
        out = out.resolve()
    return out.with_name(f"{out.stem if out.suffix == '.h5ad' else out.name}_checkpoints")


def has_checkpoint(directory: str | os.PathLike[str]) -> bool:
    """Whether a training run left a ``last.ckpt`` in ``directory`` or below it (one per fit: folds, ensemble members)."""
    directory = Path(directory)
    return directory.is_dir() and next(directory.rglob("last.ckpt"), None) is not None


CHECKPOINT_SETTINGS = "checkpoint_settings.yaml"
"""Written beside a run's checkpoints by :func:`check_checkpoint_settings`."""


def name_digest(names: Any) -> str:
    """How many names, and the start of the SHA-256 of their text: the same cells or genes in the same order."""
    import hashlib

    names = np.asarray(names).astype(str)
    return f"{len(names)}, sha256 {hashlib.sha256(chr(0).join(names).encode()).hexdigest()[:16]}"


def checkpoint_path(checkpoint_dir: str | os.PathLike[str] | None, resume: bool) -> Path | None:
    """A ``tl`` function's ``checkpoint_dir`` as a path; ``resume`` without one is refused."""
    from scatlas._errors import ConfigError

    if resume and checkpoint_dir is None:
        raise ConfigError("resume=True continues from the checkpoints in checkpoint_dir: give checkpoint_dir")
    return None if checkpoint_dir is None else Path(checkpoint_dir)


def check_checkpoint_settings(directory: Path, settings: dict[str, Any], cells: Any, genes: Any, resume: bool) -> None:
    """Write ``settings`` (what decides the trained weights: options and seed), with digests of the ``cells`` and
    ``genes`` (:func:`name_digest`; ``genes=None``: none, e.g. features whose digest is in ``settings``), beside the
    checkpoints in ``directory``; when resuming them, first refuse settings that differ from those they were written
    with (a resumed fit must continue the same training), naming each. How often checkpoints are written
    (``training.checkpoint_interval_s``) may change."""
    from scatlas._errors import ConfigError

    training = {k: v for k, v in settings.get("training", {}).items() if k != "checkpoint_interval_s"}
    settings = {**settings, "training": training, "cells": name_digest(cells), **({} if genes is None else {"genes": name_digest(genes)})}
    path = directory / CHECKPOINT_SETTINGS
    if resume and has_checkpoint(directory) and path.exists():
        saved = yaml.safe_load(path.read_text()) or {}
        differ = [f"{k}: {saved.get(k)!r}, now {settings.get(k)!r}" for k in dict.fromkeys([*saved, *settings]) if saved.get(k) != settings.get(k)]
        if differ:
            raise ConfigError(f"{directory}: the checkpoint was written with other settings ({'; '.join(differ)}); resume with the same "
                              "data and options, or start again without --resume (--overwrite)")
    directory.mkdir(parents=True, exist_ok=True)
    write_yaml(settings, path)


@contextmanager
def resumable_training(directory: str | os.PathLike[str], resume: bool, overwrite: bool = False,
                       log: Callable[[str], None] = print) -> Iterator[Path]:
    """The checkpoint directory of one command's training, kept only while it can serve a ``--resume``.

    Checked before any work: a directory holding an interrupted run's ``last.ckpt`` is refused
    unless ``resume`` (continue it) or ``overwrite`` (start again; only a directory scatlas made,
    holding :data:`OUTPUT_MARK`). When the block ends, the directory is removed: after success,
    and after a failure or interruption that came before any checkpoint was written; a
    checkpoint, once written, is kept for ``--resume``.
    """
    import shutil

    from scatlas._errors import ConfigError

    directory = check_writable(directory)
    if directory.exists() and any(directory.iterdir()) and not (directory / OUTPUT_MARK).exists():
        raise ConfigError(f"{directory}: the training checkpoints of this output go here, and it is not a directory scatlas made "
                          f"(no {OUTPUT_MARK} in it): move it away or give another output name")
    if has_checkpoint(directory) and not resume:
        if not overwrite:
            raise ConfigError(f"{directory}: holds the checkpoint of an interrupted run; add --resume to continue it (same settings), "
                              "or --overwrite to start again")
        shutil.rmtree(directory)
    if resume and not has_checkpoint(directory):
        log(f"{directory}: no checkpoint to resume from; training from the start")
    made = [p for p in (directory, *directory.parents) if not p.exists()]  # the folders this run creates, deepest first
    directory.mkdir(parents=True, exist_ok=True)
    (directory / OUTPUT_MARK).write_text("training checkpoints written by scatlas; removed when the run ends\n")
    try:
        yield directory
    except BaseException:
        if not has_checkpoint(directory):  # nothing to resume: leave no trace, not even the parent folders made for it
            shutil.rmtree(directory, ignore_errors=True)
            for parent in made[1:]:
                if parent.exists() and not any(parent.iterdir()):
                    parent.rmdir()
        raise
    shutil.rmtree(directory, ignore_errors=True)
