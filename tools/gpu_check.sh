#!/bin/bash
# The CUDA checks of the QAT fast path in one call, for a machine lent for a few minutes:
# tools/check_compiled.py (compiled fake-quant vs eager on the GPU) and tools/bench_step.py's
# step-time table at 224 px (float, torch.ao FX QAT, mecqtk eager (its kernels called directly
# and through dynamo) and compiled, bf16, channels_last, CUDA graphs), every configuration in
# its own process, timed one at a time.
# Results go to $OUT (default ./gpu_results). Where onnxscript is not installed, put copies of
# the onnxscript and onnx_ir packages in ./gpu_site (pure Python).
#
# Example:
#     OUT=/tmp/gpu bash tools/gpu_check.sh
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv | tee "$OUT/gpu.txt"
python -c "import onnxscript" 2>/dev/null || export PYTHONPATH=$PWD/gpu_site
export PYTHONPATH=$PWD:$PYTHONPATH
python -c "import torch, timm, sys; print(sys.version, torch.__version__, timm.__version__)" \
  | tee -a "$OUT/gpu.txt"
python -c "import mecqtk.run" || exit 3
(timeout 420 python tools/check_compiled.py > "$OUT/check_compiled.txt" 2>&1
 echo "check_compiled rc $?" >> "$OUT/check_compiled.txt") &
turns=$(mktemp -d)
timeout "${BENCH_TIMEOUT:-470}" python tools/bench_step.py --device cuda --size 224 --batch 64 \
  --models resnet18 resnet50 --steps 15 --warmup 8 --parallel --json --turns-dir "$turns" \
  --configs fp fp+compile fx_w8a8 w4a4+compile w2a2+compile fp+compile+bf16 w4a4+compile+bf16 \
  resnet18/w4a4 resnet18/w4a4+dynamo resnet18/fp+bf16 resnet18/w4a4+bf16 \
  resnet18/w4a4+cudagraphs resnet18/fp+compile+cl \
  resnet18/w4a4+compile+cl > "$OUT/bench_step_224.txt" 2> "$OUT/bench_step_224.err"
echo "bench_step rc $?" >> "$OUT/bench_step_224.txt"
cp "$turns/results.jsonl" "$OUT/" 2>/dev/null
wait
tail -30 "$OUT/check_compiled.txt" "$OUT/bench_step_224.txt"
