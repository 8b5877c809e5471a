"""SIGINT / SIGTERM during training: exit 130 / 143 (never 0 or 1), one line saying what was kept, nothing half-written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml


def _config(tmp_path: Path, cellbench5_path: Path) -> Path:
    config = {
        "dataset": {"name": "cb", "path": str(cellbench5_path), "batch_key": "batch", "label_key": "cell_line", "filter": {"demuxlet_cls": ["SNG"]}},
        "split": {"kind": "kfold", "n_splits": 3},
        "training": {"max_epochs": 100000, "batch_size": 16, "patience": 0},  # trains until stopped
        "models": [{"type": "ae", "hidden": [64], "latent_dim": 8}],
        "evaluation": {"figures": False},
        "output": {"dir": str(tmp_path / "out")},
    }
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _stderr_once_stopped(proc: subprocess.Popen[str], timeout: float = 120) -> str:
    """``proc``'s stderr once it exits; if it is still running after ``timeout`` s, the test fails with the stack of
    each of its threads (faulthandler, enabled by ``PYTHONFAULTHANDLER`` in its environment, prints them on SIGABRT)."""
    try:
        return proc.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        pytest.fail(f"still running {timeout} s after the signal; its threads:\n{proc.communicate(timeout=60)[1][-8000:]}")


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_during_training_exits_with_its_code_and_one_line(tmp_path, cellbench5_path, signum, code):
    config = _config(tmp_path, cellbench5_path)
    proc = subprocess.Popen([sys.executable, "-m", "scatlas", "run", str(config), "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200", "PYTHONFAULTHANDLER": "1"})
    assert proc.stdout is not None
    deadline = time.monotonic() + 120
    for line in proc.stdout:  # wait until the first split is training
        if "split 1/3" in line or time.monotonic() > deadline:
            break
    time.sleep(3)
    proc.send_signal(signum)
    stderr = _stderr_once_stopped(proc)
    assert proc.returncode == code, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(f"interrupted by {signal.Signals(signum).name}") and f"scatlas run {config} --resume" in lines[-1]
    assert not list((tmp_path / "out").rglob("*.partial"))


def _resume_config(tmp_path: Path, out: str) -> Path:
    from conftest import data_path

    config = {
        "dataset": {"name": "mesc", "path": str(data_path("scmerge_mesc_2batches.h5ad")), "batch_key": "batch", "label_key": "cellTypes"},
        "split": {"kind": "kfold", "n_splits": 3},
        "training": {"max_epochs": 40, "batch_size": 8, "patience": 5, "checkpoint_interval_s": 0},
        "models": [{"type": "ae", "hidden": [64], "latent_dim": 8, "dropout": 0.2}],
        "evaluation": {"figures": False},
        "output": {"dir": str(tmp_path / out)},
    }
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _results(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.suffix == ".npy" or p.name.startswith("scores_")}


def test_kill_9_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path):
    """RNG states and the loader's epoch live in last.ckpt: latents, reconstructions and scores are byte-identical."""
    import pandas as pd

    env = {**os.environ, "COLUMNS": "200"}
    whole = _resume_config(tmp_path, "whole")
    subprocess.run([sys.executable, "-m", "scatlas", "run", str(whole), "--quiet"], check=True, capture_output=True, env=env, timeout=600)
    killed = _resume_config(tmp_path, "killed")
    proc = subprocess.Popen([sys.executable, "-m", "scatlas", "run", str(killed), "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    checkpoints = tmp_path / "killed" / "mesc_outputs" / "saved_models" / "kfold" / "AE" / "run1" / "splits_3" / "checkpoints"
    deadline = time.monotonic() + 300
    while not (checkpoints / "last.ckpt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # a few epochs later, somewhere inside one
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (checkpoints / "early_stopped").exists(), "training ended before the kill"
    resumed = subprocess.run([sys.executable, "-m", "scatlas", "run", str(killed), "--quiet", "--resume"], capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "split 1: done earlier, skipped" in resumed.stdout
    expected, got = _results(tmp_path / "whole"), _results(tmp_path / "killed")
    assert len(expected) == 30 and expected.keys() == got.keys()
    assert [k for k in expected if expected[k] != got[k]] == []
    history = "mesc_outputs/latent_space/kfold/AE/run1/splits_3/history.csv"
    read = [pd.read_csv(root / history).drop(columns="epoch_time_s") for root in (tmp_path / "whole", tmp_path / "killed")]
    pd.testing.assert_frame_equal(*read)
    assert not checkpoints.exists()  # a finished split keeps module.pt only
    assert (checkpoints.parent / "module.pt").exists()


def test_ctrl_c_stops_pytest_while_a_command_runs_in_process(tmp_path, cellbench5_path):
    """The CLI exits 130 on SIGINT; under pytest (CliRunner, same process) the run must still stop."""
    test = tmp_path / "test_inner.py"
    test.write_text(f"""
import os, signal, threading
from typer.testing import CliRunner
from scatlas.cli import app

def test_long_run():
    threading.Timer(8.0, os.kill, (os.getpid(), signal.SIGINT)).start()
    CliRunner().invoke(app, ["run", {str(_config(tmp_path, cellbench5_path))!r}, "--quiet"])

def test_after():
    pass
""")
    conftest = Path(__file__).with_name("conftest.py")
    (tmp_path / "conftest.py").write_text(conftest.read_text())
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 2 and "KeyboardInterrupt" in proc.stdout and "test_after" not in proc.stdout.split("KeyboardInterrupt")[-1], proc.stdout


_UNDER_ALARMS = """
import faulthandler, signal, threading, time

faulthandler.dump_traceback_later(60, exit=True)  # a deadlock prints every thread's stack and fails the test

class Stop(BaseException):  # stands for the CLI's Interrupted
    pass

armed = [False]

def stop(signum, frame):
    if armed[0]:
        armed[0] = False
        raise Stop

signal.signal(signal.SIGALRM, stop)

def alarm(seconds):  # call inside the try that catches Stop: under load the timer may fire before the next line
    armed[0] = True
    signal.setitimer(signal.ITIMER_REAL, seconds)

def disarm():  # the last line of that try: the timer is cancelled (one firing meanwhile is ignored), so none is left to fire
    armed[0] = False  # while the interpreter exits, when SIGALRM's default action (terminate: exit -14) is back
    signal.setitimer(signal.ITIMER_REAL, 0)
"""


def _under_alarms(body: str) -> str:
    """Run ``body`` after :data:`_UNDER_ALARMS` in a fresh interpreter; its stdout once it has exited by itself."""
    proc = subprocess.run([sys.executable, "-c", _UNDER_ALARMS + body], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_prefetch_thread_survives_a_signal_anywhere_in_its_consumer():
    """A SIGTERM handler raising in the main thread while it takes a prefetched chunk must never leave a lock
    held: with queue.Queue, its clean-up then waited on that lock forever (a CLI that never exited after a
    scheduler's SIGTERM, within 100 interrupts here), or failed with 'release unlocked lock'. No worker outlives
    its generator, also where the signal cut the clean-up short (before: 10-16 of 2,000 waited for ever)."""
    out = _under_alarms("""
from scatlas.data.loaders import _prefetched

for n in range(2000):
    got = []
    try:
        alarm(0.0002 + 0.0003 * (n % 7))  # somewhere in the start, the reads or the clean-up, differently each time
        prefetched = _prefetched(iter(range(1, 10**9)), 2)
        try:
            got.extend(prefetched)
        finally:
            prefetched.close()
        disarm()
    except Stop:
        pass
    assert got == list(range(1, len(got) + 1)), got[:10]  # in order, none lost or repeated
deadline = time.monotonic() + 30  # a worker whose clean-up a signal cut short sees its generator gone within 0.5 s
while threading.active_count() > 1 and time.monotonic() < deadline:
    time.sleep(0.05)
print(threading.active_count() - 1)
""")
    assert int(out) == 0, "prefetch threads left running"


def test_parallel_reads_survive_a_signal_and_let_the_process_exit(tmp_path, cellbench5_path):
    """Reads split over threads (uncompressed HDF5, read around h5py), stopped by signals in the reading
    thread: every later read is exact, and the process exits. With concurrent.futures' pool a signal could
    leave a lock held and its non-daemon workers kept the interpreter from exiting."""
    import anndata as ad
    import scipy.sparse as sp

    path = tmp_path / "cells.h5ad"  # uncompressed
    ad.AnnData(X=sp.csr_matrix(ad.read_h5ad(cellbench5_path).X, dtype="float32")).write_h5ad(path)
    out = _under_alarms(f"""
import h5py, numpy as np
from scatlas.data.sources import AnnDataCSRSource, _Extents

_Extents._piece = 4096  # many pieces per read
with h5py.File({str(path)!r}) as f:
    expected = f["X/data"][:]
extents = AnnDataCSRSource({str(path)!r})._raw_arrays()["data"]
got, stopped = np.empty_like(expected), 0
for n in range(300):
    try:
        alarm(0.0002 + 0.0003 * (n % 7))
        for _ in range(20):
            got[:] = 0
            assert np.array_equal(extents.read(0, len(expected), got), expected)
        disarm()
    except Stop:
        stopped += 1
print(stopped, len(extents._pieces(0, len(expected))))
""")
    stopped, pieces = (int(v) for v in out.split())
    assert stopped > 200 and pieces > 20


def test_forked_workers_survive_a_signal_and_none_outlives_the_call():
    """The kBET and Leiden workers (forked processes), stopped by signals anywhere in the caller, the forks
    included: every finished call is exact, no worker is left running, and the process exits. With
    concurrent.futures' ProcessPoolExecutor, 100 such calls left 6 workers alive and the process hung at exit."""
    out = _under_alarms("""
import os
from scatlas.metrics._forked import forked_map

def slow(state, item):
    time.sleep(0.002 * (item % 3))
    return state + item

def running_children():
    count = 0
    for pid in os.listdir("/proc"):
        try:
            status = open(f"/proc/{pid}/status").read()
        except OSError:
            continue
        count += f"\\nPPid:\\t{os.getpid()}\\n" in status and "State:\\tZ" not in status
    return count

stopped = 0
for n in range(200):
    try:
        alarm(0.001 + 0.0047 * (n % 17))  # from inside the first fork to after the last result
        got = forked_map(slow, list(range(8)), 100, n_jobs=2)
        disarm()
    except Stop:
        stopped += 1
        continue
    assert got == [100 + i for i in range(8)], got
deadline = time.monotonic() + 30  # a worker whose fork a signal cut short exits once it sees its pipe closed
while running_children() and time.monotonic() < deadline:
    time.sleep(0.05)
print(stopped, running_children())
""")
    stopped, left = (int(v) for v in out.split())
    assert 20 < stopped < 180 and left == 0


def test_embed_stopped_by_sigterm_then_resumed_equals_an_uninterrupted_run(tmp_path):
    """`scatlas embed --stream` keeps its checkpoint when a scheduler stops it, refuses to start over silently or resume
    other settings, and --resume gives the uninterrupted latent and weights byte for byte."""
    import anndata as ad
    from conftest import data_path

    env = {**os.environ, "COLUMNS": "300", "PYTHONFAULTHANDLER": "1"}
    args = [str(data_path("scmerge_mesc_2batches.h5ad")), "--model", "ae", "--batch-key", "batch", "--quiet", "--stream", "--chunk-size", "64",
            "--max-epochs", "60", "--set", "hidden=[64]", "--set", "latent_dim=8", "--set", "batch_size=8", "--set", "dropout=0.2",
            "--set", "checkpoint_interval_s=0"]

    def embed(out: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "scatlas", "embed", *args, "--out", str(tmp_path / out), *extra], capture_output=True,
                              text=True, env=env, timeout=600)

    assert embed("whole.h5ad").returncode == 0
    assert not (tmp_path / "whole_checkpoints").exists()  # removed once the outputs are written
    proc = subprocess.Popen([sys.executable, "-m", "scatlas", "embed", *args, "--out", str(tmp_path / "cut.h5ad")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env)
    checkpoints = tmp_path / "cut_checkpoints"
    deadline = time.monotonic() + 300
    while not (checkpoints / "last.ckpt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # a few epochs later, somewhere inside one
    proc.send_signal(signal.SIGTERM)
    stderr = _stderr_once_stopped(proc)
    assert proc.returncode == 143, stderr
    assert f"checkpoint is kept in {checkpoints}" in stderr.splitlines()[-1] and "--resume" in stderr.splitlines()[-1]
    assert not (checkpoints / "early_stopped").exists(), "training ended before the signal"
    assert not (tmp_path / "cut.h5ad").exists() and not (tmp_path / "cut_model").exists()

    again = embed("cut.h5ad")  # without --resume: refused before any work, the checkpoint kept
    assert again.returncode == 2 and "--resume" in again.stderr and (checkpoints / "last.ckpt").exists()
    other = embed("cut.h5ad", "--resume", "--set", "latent_dim=16")
    assert other.returncode == 2 and "latent_dim': 8" in other.stderr and (checkpoints / "last.ckpt").exists()

    assert embed("cut.h5ad", "--resume").returncode == 0
    assert not checkpoints.exists()
    whole, cut = ad.read_h5ad(tmp_path / "whole.h5ad"), ad.read_h5ad(tmp_path / "cut.h5ad")
    assert whole.obsm["X_ae"].tobytes() == cut.obsm["X_ae"].tobytes()
    assert (tmp_path / "whole_model" / "module.pt").read_bytes() == (tmp_path / "cut_model" / "module.pt").read_bytes()


class _Stopped(BaseException):
    """Stands for the CLI's SIGINT / SIGTERM exception (a BaseException)."""


def test_resumable_training_keeps_a_checkpoint_only_once_one_is_written(tmp_path):
    from scatlas._errors import ConfigError
    from scatlas._io import OUTPUT_MARK, resumable_training

    directory, said = tmp_path / "out_checkpoints", []
    with pytest.raises(_Stopped):
        with resumable_training(tmp_path / "new" / "folders" / "out_checkpoints", resume=False):
            raise _Stopped  # stopped before the first checkpoint: nothing to resume, nothing kept, no folder made for it
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(_Stopped):
        with resumable_training(directory, resume=False) as d:
            (d / "last.ckpt").write_bytes(b"state")
            raise _Stopped
    assert (directory / "last.ckpt").exists() and (directory / OUTPUT_MARK).exists()
    with pytest.raises(ConfigError, match="add --resume"):
        with resumable_training(directory, resume=False):
            pass
    with resumable_training(directory, resume=True) as d:
        assert (d / "last.ckpt").read_bytes() == b"state"
    assert not directory.exists()  # the run ended: removed
    with resumable_training(directory, resume=True, log=said.append):
        pass
    assert said == [f"{directory}: no checkpoint to resume from; training from the start"]
    (directory / "last.ckpt").parent.mkdir()
    (directory / "last.ckpt").write_bytes(b"state")
    with pytest.raises(ConfigError, match="not a directory scatlas made"):  # a folder of the user's is never deleted
        with resumable_training(directory, resume=False, overwrite=True):
            pass
    (directory / OUTPUT_MARK).write_text("")
    with resumable_training(directory, resume=False, overwrite=True) as d:  # --overwrite starts again
        assert not (d / "last.ckpt").exists()


def test_tl_functions_refuse_resume_without_a_checkpoint_dir():
    import anndata as ad
    from conftest import data_path

    import scatlas as sa
    from scatlas._errors import ConfigError

    kang = ad.read_h5ad(data_path("kang18_muscat_4samples.h5ad"))

    for call in (lambda: sa.tl.embed(kang.copy(), "ae", resume=True), lambda: sa.tl.transfer(kang.copy(), kang.copy(), label_key="cell_type", resume=True),
                 lambda: sa.tl.aggregate(kang.copy(), sample_key="sample_id", label_key="cell_type", resume=True)):
        with pytest.raises(ConfigError, match="resume=True continues from the checkpoints in checkpoint_dir: give checkpoint_dir"):
            call()


_TRAIN_SCRIPT = """
import sys
from pathlib import Path
from scatlas.tl._annotation import load_annotate_config, train_annotator
from scatlas.tl._transfer import load_transfer_config, run_transfer
kang, command, out, resume = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4] == "1"
training = {"checkpoint_interval_s": 0, "max_epochs": 40, "patience": 40}  # a checkpoint every epoch; no early stop
dataset = {"name": "kang", "path": kang, "label_key": "author_cell_type", "batch_key": "sample_id"}
if command == "annotate":
    config = load_annotate_config({"dataset": dataset, "model": {"type": "mlp"}, "split": {"kind": "kfold", "n_splits": 3}, "training": training})
    train_annotator(config, out, log=lambda _: None, resume=resume)
else:
    config = load_transfer_config({"reference": dataset, "queries": [kang], "model": {"type": "mlp"}, "training": training})
    run_transfer(config, out, log=lambda _: None, resume=resume)
"""


@pytest.mark.parametrize(("command", "fits"), [("annotate", ["splits_1", "splits_2", "splits_3", "final"]), ("transfer", [""])])
def test_classifier_training_killed_then_resumed_equals_an_uninterrupted_run(tmp_path, command, fits):
    """`annotate train` (each fold and the final model) and `transfer` keep their networks' checkpoints beside the output
    when killed, and resuming gives the uninterrupted run's outputs byte for byte."""
    from conftest import data_path

    kang = str(data_path("kang18_muscat_4samples.h5ad"))

    def train(out: str, resume: bool) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-c", _TRAIN_SCRIPT, kang, command, str(tmp_path / out), "1" if resume else "0"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    assert train("whole", False).wait(timeout=600) == 0
    assert not (tmp_path / "whole_checkpoints").exists()
    proc, checkpoints = train("cut", False), tmp_path / "cut_checkpoints"
    last = checkpoints / fits[-1] / "last.ckpt"  # the last fit has started: earlier ones are done and resumed as such
    deadline = time.monotonic() + 300
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training ended before the kill"
    assert all((checkpoints / fit / "last.ckpt").exists() for fit in fits) and not (tmp_path / "cut").exists()
    resumed = train("cut", True)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read() if resumed.stderr else ""
    assert not checkpoints.exists()
    files = sorted(p.relative_to(tmp_path / "whole") for p in (tmp_path / "whole").rglob("*") if p.is_file() and p.suffix != ".html")
    differ = [str(f) for f in files if (tmp_path / "whole" / f).read_bytes() != (tmp_path / "cut" / f).read_bytes()]
    assert files and differ == [f for f in map(str, files) if f.endswith("history.csv")]  # only the epochs' wall times differ


def test_aggregate_killed_then_resumed_equals_an_uninterrupted_run(tmp_path):
    """`aggregate` keeps each seed's set-model checkpoint when killed (one per epoch with --checkpoint-interval 0); --resume
    reloads the finished seeds, continues the third from its last epoch (the same views drawn) and writes the uninterrupted
    run's tables, profiles, model and config, also with another checkpoint interval."""
    from conftest import data_path

    args = [sys.executable, "-m", "scatlas", "aggregate", str(data_path("onek1k_4types_40donors.h5ad")), "--sample-key", "donor_id,cell_type",
            "--label-key", "donor_id", "--batch-key", "cell_type", "--features", "pca:20", "--seeds", "3", "--width", "256", "--max-epochs", "40"]

    def aggregate(out: str, *extra: str) -> subprocess.Popen[str]:
        return subprocess.Popen([*args, "--out", str(tmp_path / out), *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    assert aggregate("whole").wait(timeout=600) == 0
    assert not (tmp_path / "whole_checkpoints").exists()
    proc, checkpoints = aggregate("cut", "--checkpoint-interval", "0"), tmp_path / "cut_checkpoints"
    deadline = time.monotonic() + 300
    while not (checkpoints / "seed_2" / "last.ckpt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before the kill"
    assert all((checkpoints / f"seed_{s}" / "last.ckpt").exists() for s in range(3)) and not (tmp_path / "cut").exists()
    again = aggregate("cut", "--seeds", "4", "--resume")
    _, stderr = again.communicate(timeout=600)
    assert again.returncode == 2 and "seeds: [0, 1, 2], now [0, 1, 2, 3]" in stderr
    resumed = aggregate("cut", "--resume", "--checkpoint-interval", "30")
    _, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr
    assert not checkpoints.exists()
    files = sorted(p.name for p in (tmp_path / "whole").iterdir() if p.suffix not in (".html", ".png"))
    assert "model.pt" in files and "metrics.csv" in files
    assert [f for f in files if (tmp_path / "whole" / f).read_bytes() != (tmp_path / "cut" / f).read_bytes()] == []
