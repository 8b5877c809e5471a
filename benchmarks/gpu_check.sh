#!/usr/bin/env bash
# The one prepared GPU check: every GPU figure benchmarks/RESULTS.md reports, in one command of at
# most 10 minutes on one H100 / H200, each step under its own time limit so that a slow one cannot
# take the others down with it.
#
#   bash benchmarks/gpu_check.sh prepare      # here, once: wheels the device image lacks -> .whl/,
#                                             # the real data the steps read -> .gpu_data/
#   device run: command "bash benchmarks/gpu_check.sh", carry [".whl", ".gpu_data"], timeout_s 600
#
# Steps (figures of RESULTS.md's H100 sections), each logged to $OUT/<step>.log:
#   ae_throughput   AE / scMEDAL-FE / scMEDAL-RE vs scvi-tools SCVI, batch 128 and 1024, 1M cells
#   metrics_100k    the whole benchmark suite at 100,000 cells vs scib-metrics' Benchmarker (JAX CUDA)
#   atlas_scale     aenmf / cond_aenmf streamed from disk at 1M and 10M cells, rank 256
#   classifiers     annotation classifiers' training throughput (200,000 cells)
# and $OUT/gpu_check.md gathers each step's printed table with its wall time and exit status.
# Without a GPU the same steps run on the CPU at toy sizes (GPU_CHECK_SMALL=1 forces that), which
# is how the script itself is tested.
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=(  # what scatlas, scanpy, scib-metrics and scvi-tools need beyond the device image (KINDS.md); the
  # Cell Ontology (98 MB) and POT (33 MB) are left out: no step imports them
  anndata array-api-compat legacy-api-wrap natsort scverse-misc zarr numcodecs donfig google-crc32c zstandard
  scanpy session-info2 umap-learn pynndescent igraph texttable leidenalg
  pydantic pydantic-core annotated-types typing-inspection
  scib-metrics plottable
  scvi-tools==1.4.2 docrep ml-collections mudata pyro-ppl pyro-api sparse
)
DATA=(onek1k_4types_40donors.h5ad zheng17_sorted_pbmc_reference.h5ad)

if [[ "${1:-}" == prepare ]]; then
  rm -rf .whl .gpu_data && mkdir -p .whl .gpu_data
  for name in "${WHEELS[@]}"; do  # the version this checkout's environment has, where it has one
    base=${name%%==*}
    pinned=$(python -m pip show "$base" 2>/dev/null | awk '/^Version:/ {print $2}')
    [[ "$name" != *==* && -n "$pinned" ]] && name="$base==$pinned"
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
      -d .whl "$name" 2>&1 | grep -v -E '^(WARNING: Location|ERROR)' || true
    if ! ls .whl | grep -qi "^${base//-/[-_]}-"; then  # a source-only package (docrep): build its pure-Python wheel here
      python -m pip wheel -q --no-deps -w .whl "$name" 2>&1 | grep -v '^WARNING: Location' || true
    fi
    ls .whl | grep -qi "^${base//-/[-_]}-" || { echo "error: no Python 3.12 x86-64 wheel of $name" >&2; exit 1; }
  done
  for f in "${DATA[@]}"; do cp "../shared/data/$f" .gpu_data/; done
  echo "prepared: $(ls .whl | wc -l) wheels, $(du -sh .whl .gpu_data | awk '{print $1}' | paste -sd+) in .whl + .gpu_data (the device carries 64 MiB at most)"
  exit 0
fi

OUT=${OUT:-outputs/gpu_check}
mkdir -p "$OUT"
if [[ -d .whl ]] && ! python3 -c "import anndata" 2>/dev/null; then  # the device image: none of the scverse stack
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "error: installing .whl failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
[[ -d .gpu_data ]] && export SCATLAS_SHARED_DATA="$PWD/.gpu_data"

if [[ "${GPU_CHECK_SMALL:-}" == 1 ]] || ! python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "no GPU (or GPU_CHECK_SMALL=1): every step at toy sizes, to test the script"
  STEPS=(
    "ae_throughput|60|benchmarks/ae_throughput.py --cells 4000 --train-cells 2000 --batch-sizes 128 --models ae --skip-scvi --epochs 2"
    "metrics_100k|240|benchmarks/metrics_speed.py --cells 3000"
    "atlas_scale|60|benchmarks/atlas_scale.py --sizes 20000 --rank 16 --chunk-size 10000 --models aenmf --sk-cells 2000 --sk-rank 8 --sk-epochs 2"
    "classifiers|60|benchmarks/annotation_models.py --skip-cv --throughput-cells 4000"
  )
else
  STEPS=(
    "ae_throughput|170|benchmarks/ae_throughput.py --cells 1000000 --train-cells 200000 --batch-sizes 128 1024 --models ae fe re"
    "metrics_100k|150|benchmarks/metrics_speed.py --cells 100000"
    "atlas_scale|170|benchmarks/atlas_scale.py --sizes 1000000 10000000 --workdir /tmp/atlas"
    "classifiers|60|benchmarks/annotation_models.py --skip-cv --throughput-cells 200000"
  )
fi

report="$OUT/gpu_check.md"
{
  echo "# gpu_check $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} >"$report"
failed=0
for step in "${STEPS[@]}"; do
  IFS='|' read -r name limit args <<<"$step"
  echo "== $name (at most ${limit} s): python3 $args"
  start=$(date +%s)
  # shellcheck disable=SC2086  # the step's arguments are meant to split
  (cd benchmarks && timeout "$limit" python3 ${args#benchmarks/}) >"$OUT/$name.log" 2>&1
  rc=$?
  took=$(( $(date +%s) - start ))
  (( rc == 0 )) || failed=1
  {
    echo; echo "## $name: exit $rc, ${took} s$([[ $rc == 124 ]] && echo ' (stopped at its limit)')"
    echo; echo '```'; grep -v -i -E 'warning|^\s*warnings\.warn|^\s*$' "$OUT/$name.log" | tail -n 40; echo '```'
  } >>"$report"
  echo "   exit $rc after ${took} s"
done
echo "table: $report"
exit $failed
