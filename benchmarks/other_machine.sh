#!/usr/bin/env bash
# Chapters 4-5's model, generation and training measured on a machine of another kind (an Intel CPU, AMX, a GPU).
#
#     bash benchmarks/other_machine.sh [OUT]        # about 6 minutes; tables printed, logs and JSON in OUT
#
# The benchmark rows this project's own machine (a 2-core AMD EPYC, no GPU) cannot give, in one run, GPT-2 small:
# on the CPU at 2 threads (cores 0 and 1, the machine of issue 11) and at all threads, one decode step taken apart
# (`decode_breakdown.py`) and the generation and decode rows (`bench.py --quick`); where CUDA is present, the GPU
# row (bf16 autocast, `torch.compile`, context 1,024) with its MFU against PEAK_TFLOPS (default 989, an H100's and
# an H200's dense bf16). Each step has a time limit, so one that hangs does not take the others with it.
set -uo pipefail
out=$(realpath -m "${1:-benchmarks/results/other_machine}")
mkdir -p "$out"
cd "$(dirname "$0")"
export PYTHONUNBUFFERED=1

nproc
grep -m1 "model name" /proc/cpuinfo
grep -o -w "amx_bf16\|avx512_bf16\|avx512f\|avx2" /proc/cpuinfo | sort | uniq -c
# The kernels' build (about 20 s once) before any timing.
python -c "from hf_scratchgpt.decode_kernel_scratchgpt import decode_kernels; print('decode kernels:', decode_kernels())"

run() {  # run NAME SECONDS COMMAND...: the command's output to the screen and to OUT/NAME.log, its JSON to OUT/NAME.json
    local name=$1 seconds=$2
    shift 2
    timeout "$seconds" "$@" --json "$out/$name.json" 2>&1 | grep -v "Warning" | tee "$out/$name.log"
}
two_cores=(env OMP_NUM_THREADS=2 taskset -c 0,1)
generation=(--quick --shapes gpt2-small --attn sdpa --only generate,decode)

run breakdown-2-threads 120 "${two_cores[@]}" python decode_breakdown.py
run breakdown-all-threads 80 python decode_breakdown.py
run bench-2-threads 150 "${two_cores[@]}" python bench.py "${generation[@]}"
run bench-all-threads 60 python bench.py "${generation[@]}"
if python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    SCRATCHGPT_DECODE_KERNEL=0 run gpu-row 180 python bench.py --device cuda --only bf16-train --shapes gpt2-small \
        --attn sdpa --context 1024 --batch 32 --steps 8 --compile --peak-tflops "${PEAK_TFLOPS:-989}"
fi
echo "logs and JSON in $out"
