"""Streamed workflows on atlas-sized files: peak host memory (``VmHWM``) and wall time of ``scatlas embed --stream``, ``scatlas transfer`` and ``scatlas aggregate --stream``.

Cells: OneK1K PBMCs (``../shared/data``, raw counts, 1,000 genes, 114 non-zeros per cell)
resampled with replacement to each ``--sizes`` N and written chunk by chunk as a CSR ``.h5ad``
(as ``atlas_scale.py`` writes them). For each N, in a fresh process, ``scatlas embed FILE --stream``
fits the default AE (2,000 → here ``--n-top-genes`` highly variable genes, batch = donor) for
``--epochs`` epochs and writes the latent of every cell. Peer, same script: the same command without
``--stream`` (the matrix loaded, as scanpy users load it), at the sizes in ``--in-memory-sizes``.

``scatlas transfer`` learns the default MLP on the 7,811 OneK1K cells (``cell_type``) and maps
the N-cell file as its query, ``--query-chunk-size`` cells at a time from disk. Peer: the same
transfer through ``scatlas.tl.transfer`` with the query loaded (``anndata.read_h5ad``), at the
sizes in ``--in-memory-sizes``.

``reference`` (``--workflows reference``): ``scatlas transfer --stream`` learns the MLP on the
N-cell file itself (streamed, minibatches of ``--batch-size``, ``--transfer-epochs`` epochs at
most) and maps the 7,811 OneK1K cells. Peer: ``tl.transfer`` with that reference loaded.

``aggregate`` (``--workflows aggregate``): ``scatlas aggregate --stream`` with ``pca:50`` features
(streamed HVGs and exact PCA; the matrix never loaded), pseudo-bulk samples of one cell type in one
donor, label = cell type, ``--epochs`` epochs of the set model, one seed. Peer: the same command
without ``--stream`` (the matrix loaded).

    python benchmarks/streamed_workflows.py --sizes 1000000 5000000 --in-memory-sizes 1000000
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import CLI_PROGRAM, PEAK_LINE, SHARED, fresh_process, machine
from atlas_scale import DATASET, write_resampled

_IN_MEMORY_TRANSFER = f"""
import sys
import anndata as ad
import scatlas as sa
reference, query = ad.read_h5ad(sys.argv[1]), ad.read_h5ad(sys.argv[2])
sa.tl.transfer(reference, query, label_key="cell_type", input="counts", log=lambda _: None,
               training={{"max_epochs": int(sys.argv[3]), "batch_size": int(sys.argv[4]), "patience": 10}})
{PEAK_LINE}
"""


def transfer_run(path: Path, out: Path, stream: bool, epochs: int, chunk_size: int) -> dict[str, float | str]:
    """``scatlas transfer`` (query ``path`` streamed) or ``tl.transfer`` with the query loaded, in a fresh process."""
    if not stream:
        return fresh_process(_IN_MEMORY_TRANSFER, [str(SHARED / DATASET), str(path), str(epochs), "64"])
    return fresh_process(CLI_PROGRAM, ["transfer", "--reference", str(SHARED / DATASET), "--label-key", "cell_type", "--query", str(path), "--out", str(out),
                      "--overwrite", "--max-epochs", str(epochs), "--query-chunk-size", str(chunk_size)])


def reference_run(path: Path, out: Path, stream: bool, epochs: int, batch_size: int, chunk_size: int) -> dict[str, float | str]:
    """``scatlas transfer --stream`` with the N-cell file ``path`` as the reference, or ``tl.transfer`` with it loaded, in a fresh process."""
    if not stream:
        return fresh_process(_IN_MEMORY_TRANSFER, [str(path), str(SHARED / DATASET), str(epochs), str(batch_size)])
    return fresh_process(CLI_PROGRAM, ["transfer", "--reference", str(path), "--label-key", "cell_type", "--query", str(SHARED / DATASET), "--out", str(out),
                      "--overwrite", "--stream", "--max-epochs", str(epochs), "--batch-size", str(batch_size), "--chunk-size", str(chunk_size),
                      "--query-chunk-size", str(chunk_size)])


def embed_run(path: Path, out: Path, stream: bool, epochs: int, n_top_genes: int, batch_size: int, chunk_size: int) -> dict[str, float | str]:
    """``scatlas embed`` on ``path`` in a fresh process: wall time and peak RSS (GB)."""
    args = ["embed", str(path), "--out", str(out), "--overwrite", "--model", "ae", "--batch-key", "donor_id", "--label-key", "cell_type",
            "--max-epochs", str(epochs), "--n-top-genes", str(n_top_genes), "--set", f"batch_size={batch_size}", "--quiet"]
    if stream:
        args += ["--stream", "--chunk-size", str(chunk_size)]
    return fresh_process(CLI_PROGRAM, args)


def aggregate_run(path: Path, out: Path, stream: bool, epochs: int) -> dict[str, float | str]:
    """``scatlas aggregate`` (``pca:50`` features, samples = donor × cell type) on ``path`` in a fresh process."""
    args = ["aggregate", str(path), "--out", str(out), "--overwrite", "--sample-key", "donor_id,cell_type", "--label-key", "cell_type",
            "--batch-key", "donor_id", "--features", "pca:50", "--seeds", "1", "--max-epochs", str(epochs)]
    return fresh_process(CLI_PROGRAM, [*args, *(["--stream"] if stream else [])])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 5_000_000])
    parser.add_argument("--in-memory-sizes", type=int, nargs="*", default=[1_000_000])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--n-top-genes", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--chunk-size", type=int, default=100_000)
    parser.add_argument("--transfer-epochs", type=int, default=20)
    parser.add_argument("--workflows", nargs="+", default=["embed", "transfer", "reference"],
                        choices=["embed", "transfer", "reference", "aggregate"])
    parser.add_argument("--workdir", default=None, help="where the .h5ad files go (default: a temporary directory)")
    args = parser.parse_args()

    print(f"machine: {machine()}")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="scatlas_streamed_"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in args.sizes:
        path = workdir / f"onek1k_{n}_counts.h5ad"
        if not path.exists():
            write_resampled(path, n, counts=True)
        size_gb = path.stat().st_size / 2**30
        for stream in (True, False):
            if not stream and n not in args.in_memory_sizes:
                continue
            if "embed" in args.workflows:
                result = embed_run(path, workdir / f"embed_{n}.h5ad", stream, args.epochs, args.n_top_genes, args.batch_size, args.chunk_size)
                rows.append((f"scatlas embed{' --stream' if stream else ' (matrix loaded: peer)'}", n, size_gb, result))
                print(rows[-1], flush=True)
            if "transfer" in args.workflows:
                result = transfer_run(path, workdir / f"transfer_{n}", stream, args.transfer_epochs, args.chunk_size)
                rows.append((f"scatlas transfer{' (query streamed)' if stream else ': tl.transfer, query loaded (peer)'}", n, size_gb, result))
                print(rows[-1], flush=True)
            if "reference" in args.workflows:
                result = reference_run(path, workdir / f"reference_{n}", stream, args.transfer_epochs, args.batch_size, args.chunk_size)
                rows.append((f"scatlas transfer{' --stream (reference streamed)' if stream else ': tl.transfer, reference loaded (peer)'}", n, size_gb, result))
                print(rows[-1], flush=True)
            if "aggregate" in args.workflows:
                result = aggregate_run(path, workdir / f"aggregate_{n}", stream, args.epochs)
                rows.append((f"scatlas aggregate{' --stream' if stream else ' (matrix loaded: peer)'}", n, size_gb, result))
                print(rows[-1], flush=True)
    print(f"\nembed: AE, {args.epochs} epoch(s), {args.n_top_genes} HVGs, batch {args.batch_size:,}; transfer: MLP on {DATASET} (reference: "
          f"on the N cells, batch {args.batch_size:,}), {args.transfer_epochs} epochs at most; chunk {args.chunk_size:,} cells")
    print(f"{'what':50s} {'cells':>12s} {'file GB':>8s} {'wall s':>8s} {'peak RSS GB':>12s}")
    for name, n, size_gb, r in rows:
        if "error" in r:
            print(f"{name:50s} {n:12,d} {size_gb:8.2f} error: {r['error']}")
        else:
            print(f"{name:50s} {n:12,d} {size_gb:8.2f} {r['wall_s']:8.0f} {r['peak_rss_gb']:12.2f}")


if __name__ == "__main__":
    main()
