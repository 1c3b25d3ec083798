#!/usr/bin/env bash
# One GPU session's worth of checks, in under 10 minutes, on a CUDA machine with torch and triton
# already installed (no internet, nothing installed here: the repo is put on PYTHONPATH):
#   1. the CUDA-relevant tests, with PROCRUSTES_BACKEND unset so CUDA tensors take the Triton path;
#   2. per-kernel timings of the Triton ops at 16M weights (both log-histogram variants);
#   3. benchmarks/bench_update.py --quick, benchmarks/bench_train_step.py and benchmarks/bench_layers.py (full shapes: 4096x4096 x 8192
#      tokens and ResNet-18's 3x3 layers at batch 64, float32 and bfloat16, densities 100%..1%).
# Every part has its own time limit (180 + 45 + 60 + 30 + 270 s at most) and log; a failing part does
# not stop the others. Logs, CSVs and summary.txt go to ${OUT:-benchmarks/results}; the summary
# table is printed last. The exit status is 0 only if every part passed.
#
#   bash benchmarks/gpu_check.sh            # from any directory
set -u

cd "$(dirname "$0")/.." || exit 1
OUT_DIR="${OUT:-benchmarks/results}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
PY="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset PROCRUSTES_BACKEND TRITON_INTERPRET
SCRIPT_START=$(date +%s)

PARTS=()
CODES=()
SECS=()

# run_part NAME LIMIT_S CMD...: runs CMD with a time limit, its output to OUT_DIR/NAME.log.
run_part() {
    local name=$1 limit=$2
    shift 2
    local log="$OUT_DIR/$name.log" start rc
    echo "=== $name (limit ${limit}s): $*"
    start=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
    rc=$?
    PARTS+=("$name")
    CODES+=("$rc")
    SECS+=("$(($(date +%s) - start))")
    tail -n 15 "$log"
    [ "$rc" -eq 124 ] && echo "--- $name: timed out after ${limit}s"
    echo "--- $name: exit $rc"
}

has_flag() { grep -q -- "\"$2\"" "$1" 2>/dev/null; }

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -n 4
    "$PY" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "| torch", torch.__version__, "| triton", triton.__version__, "| cuda available", torch.cuda.is_available())' 2>&1
} | tee "$OUT_DIR/env.txt"

# 1. Tests. Without CUDA they would still pass through the interpreter, which is not the point.
run_part tests 180 "$PY" -m pytest tests/test_triton_ops.py tests/test_layers.py tests/test_optim.py tests/test_native_weight.py tests/test_compile.py tests/test_backend_equivalence.py \
    tests/test_triton_sparse_linear.py tests/test_triton_sparse_conv.py tests/test_compute.py tests/test_tiles.py \
    -q -p no:cacheprovider -rs --junitxml "$OUT_DIR/pytest.xml"

# 2. Kernel timings: one launch of each op on a 16M-weight segment at 10% density.
run_part kernels 45 "$PY" - "$OUT_DIR/kernel_times.csv" <<'EOF'
import csv, sys
import torch, triton
from triton.testing import do_bench
from procrustes_kernels.ops.update import reference as ref, triton_kernels as tri
from procrustes_kernels.ops.contract import Segment, StepParams
from procrustes_kernels.storage import group_pointers, pack_bits

assert torch.cuda.is_available(), "no CUDA device"
dev, n = torch.device("cuda"), 1 << 24
g = torch.Generator(device=dev).manual_seed(0)
mask = torch.rand(n, device=dev, generator=g) < 0.1
bits = pack_bits(mask)
nnz = int(mask.sum())
seg = Segment(seed=12345, bound=0.03, numel=n, values=torch.randn(nnz, device=dev) * 0.1,
              bits=bits, group_ptr=group_pointers(bits, n), grad=torch.randn(n, device=dev) * 0.01,
              momentum=torch.randn(nnz, device=dev) * 0.01, scale_prev=0.9)
p = StepParams(lr=0.1, momentum=0.9, weight_decay=1e-4, scale=0.81)
thr = float(ref.scores(seg, p).kthvalue(int(0.9 * n)).values)
high = int(tri.radix_histogram(seg, p).nonzero().max())
copy_ms = do_bench(lambda: seg.grad.clone(), quantiles=[0.5])
ops = {
    "materialize": lambda: tri.materialize(seg.seed, seg.bound, 0.9, seg.values, seg.bits, seg.group_ptr, n, torch.float32),
    "log_histogram(atomic)": lambda: tri.log_histogram(seg, p),
    "log_histogram(local)": lambda: tri.log_histogram(seg, p, local_hist=True),
    "radix_histogram(high)": lambda: tri.radix_histogram(seg, p),
    "radix_histogram(low)": lambda: tri.radix_histogram(seg, p, high),
    "compact": lambda: tri.compact(seg, p, thr),
    "compact(hist)": lambda: tri.compact(seg, p, thr, with_histogram=True),
    "reference.compact": lambda: ref.compact(seg, p, thr),
}
rows = [{"op": "grad.clone (copy)", "median_ms": round(copy_ms, 4), "x_copy": 1.0}]
for name, fn in ops.items():
    ms = do_bench(fn, quantiles=[0.5])
    rows.append({"op": name, "median_ms": round(ms, 4), "x_copy": round(ms / copy_ms, 2)})
    print(f"{name:24s} {ms:9.3f} ms  {ms / copy_ms:6.2f}x copy", flush=True)
with open(sys.argv[1], "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=["op", "median_ms", "x_copy", "numel", "device", "triton"])
    w.writeheader()
    for r in rows:
        w.writerow({**r, "numel": n, "device": torch.cuda.get_device_name(), "triton": triton.__version__})
EOF

# 3. DistributedDataParallel: 2 ranks (NCCL with two GPUs, else gloo on the one), ranks identical.
run_part ddp 60 "$PY" benchmarks/ddp_check.py --steps 30

# 4. Benchmarks written by others: pass --quick / --out only where the script has them.
for bench in bench_update bench_train_step bench_compile bench_layers; do
    file="benchmarks/$bench.py"
    if [ ! -f "$file" ]; then
        echo "=== $bench: $file not present, skipped"
        continue
    fi
    args=()
    limit=60
    if [ "$bench" = bench_layers ]; then
        limit=270  # the headline benchmark runs at full size
    elif [ "$bench" = bench_train_step ]; then
        limit=30
        args+=(--repeats 50)
    elif [ "$bench" = bench_compile ]; then
        limit=60  # graph breaks, fullgraph, recompiles, export and the compiled/eager ratios
        args+=(--rounds 2 --repeats 20)
    else
        has_flag "$file" --quick && args+=(--quick)
    fi
    has_flag "$file" --out && args+=(--out "$OUT_DIR/$bench.csv")
    run_part "$bench" "$limit" "$PY" "$file" ${args[@]+"${args[@]}"}
done

# Summary, last.
status=0
for rc in "${CODES[@]}"; do
    [ "$rc" -ne 0 ] && status=1
done
{
    echo
    echo "GPU check summary ($(($(date +%s) - SCRIPT_START)) s total; logs in $OUT_DIR)"
    printf '%-14s %6s %6s  %s\n' part exit secs result
    for i in "${!PARTS[@]}"; do
        name=${PARTS[$i]}
        rc=${CODES[$i]}
        case $rc in
            0) result=ok ;;
            124 | 137) result="TIMED OUT" ;;
            *) result=FAILED ;;
        esac
        if [ "$name" = tests ]; then
            line=$(grep -E '[0-9]+ (passed|failed)' "$OUT_DIR/tests.log" | tail -n 1)
            result="$result ${line//=/}"
        fi
        printf '%-14s %6s %6s  %s\n' "$name" "$rc" "${SECS[$i]}" "$result"
    done
    if [ -s "$OUT_DIR/kernel_times.csv" ]; then
        echo
        echo "Triton kernels, 16M weights (median ms, x copy time):"
        tail -n +2 "$OUT_DIR/kernel_times.csv" | awk -F, '{ printf "  %-24s %9s ms %7sx\n", $1, $2, $3 }'
    fi
} | tee "$OUT_DIR/summary.txt"
exit $status
