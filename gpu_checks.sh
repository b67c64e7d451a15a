#!/usr/bin/env bash
# Every GPU check and benchmark of this project, in one run of at most 9 min 45 s (the sum of the time limits)
# on one GPU.
#
#   bash gpu_checks.sh              # logs in gpu_logs/ (or in $OUT when that is set)
#
# 1. the kernel benchmark (bridge_kernels.py, bf16): fused add+LayerNorm vs eager vs torch.compile,
#    masked attention vs SDPA, forward and forward+backward, and the tuned kernels' values on those shapes; then
#    the values of the attention kernels with dropout (a compile-time switch: other kernels) on the shapes step 2
#    runs them at, which also leaves them compiled and tuned in Triton's cache for step 2; then the host's time a
#    call of each path on tiny shapes (where the host is the limit)
#                                                                      -> kernels.txt
# 2. base pre-training steps (bf16, 288 px, micro-batch 32, dropout 0.1): Triton kernels, then PyTorch's,
#    samples/s and MFU; then one step under torch.profiler: the share of it the GPU was busy (low: the host's
#    launches hold it back) and the top kernels (which SDPA backend the masked calls take, the Triton kernels'
#    share)                                                            -> pretrain_triton.txt, pretrain_torch.txt
# 3. the kernel test suite compiled on CUDA (BRIDGETOWER_TEST_DEVICE=cuda, what test_on_gpu runs, here with its
#    output streamed, so that a timeout still shows how far it got), last: its compile time is the least known
#                                                                      -> gpu_tests.txt
# Each step has its own time limit, so that one that hangs or fails leaves the others their time; the script
# exits non-zero if any step failed. Copy the tables into README.md (Benchmarks), with the GPU and the date, and
# kernels.txt's last line (AUTO_TRITON as measured) into bridge_kernels.py.
set -u
cd "$(dirname "$0")"
log_dir=${OUT:-gpu_logs}
mkdir -p "$log_dir"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
failed=()

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to NAME.txt and to the terminal
    local name=$1 limit=$2
    shift 2
    echo "=== $name: $* (limit ${limit}s)" | tee "$log_dir/$name.txt"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$log_dir/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$log_dir/$name.txt"
    [ "$rc" -eq 0 ] || failed+=("$name")
}

{
    date -u
    timeout 5 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    timeout 10 python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$log_dir/machine.txt"

# Step 1 was estimated at about 150 s before its dropout check, which compiles and tunes the two dropout kernels
# (forward, backward) over their configs at four shapes (each compile about 1 s in bf16 for sm_90 with triton 3.9 on
# the 2-core development CPU) that step 2 then finds compiled and tuned (the kernels keep their tuning on disk):
# 20 s moved from step 2 to step 1. The benchmark's `# wall time` line gives each part's time, for the next rebalancing.
step kernels 220 python3 bridge_kernels.py --dtype bf16 --batch 32
pretrain=(python3 pretrain.py config/pretrain_base.py --bench --bench_steps=6 --micro_batch_size=32 --batch_size=32
          --bench_profile=True)  # the profiled step comes last: 10 s allowed for it in each limit
BRIDGETOWER_KERNELS=triton step pretrain_triton 110 "${pretrain[@]}"  # kernels tuned by step 1 (on disk)
BRIDGETOWER_KERNELS=torch step pretrain_torch 90 "${pretrain[@]}"
# the sm_80/sm_90 compile test runs in CI already
# one small config for every kernel: the tests check values, and tuning (or compiling the large fp32 tiles) for each of
# the ~70 variants they build would not fit the limit; step 1 checked the tuned configs on BridgeTower's shapes
BRIDGETOWER_AUTOTUNE=0 BRIDGETOWER_TEST_DEVICE=cuda step gpu_tests 150 python3 -m pytest tests/test_kernels.py -q -rs -p no:cacheprovider \
    -k "not test_compiles_for and not test_on_gpu"

if [ ${#failed[@]} -gt 0 ]; then
    echo "failed: ${failed[*]}"
    exit 1
fi
echo "all GPU checks passed; logs in $log_dir"
