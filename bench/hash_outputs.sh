#!/usr/bin/env bash
# sha256 of the model quantize writes for each bundled model: every rounding method at W8A8, W4A8,
# weight-only W4 and --target tensorrt. Run it before and after a refactor that
# must not change behaviour; the two lists must match line for line.
# Usage: bench/hash_outputs.sh OUTDIR  (prints "model setting method sha256" lines)
set -euo pipefail
out=${1:?usage: bench/hash_outputs.sh OUTDIR}
mkdir -p "$out"
run() {  # model setting method extra-args...
  local model=$1 setting=$2 method=$3 name
  shift 3
  name=$(basename "$model" .onnx)
  local extra=(--preset fast)
  [ "$method" = adaround ] && extra+=(--early-stop 0)
  [ "$method" = rtn ] && extra=()
  onnxflex quantize "$model" --method "$method" --seed 0 "${extra[@]}" "$@" \
    -o "$out/$name.$setting.$method.q.onnx" --quiet
  echo "$name $setting $method $(sha256sum "$out/$name.$setting.$method.q.onnx" | cut -d' ' -f1)"
}
for model in models/*.onnx; do
  for method in rtn flexround adaround signround; do
    run "$model" w8a8 "$method" --wbits 8 --abits 8
    run "$model" w4a8 "$method" --wbits 4 --abits 8
    run "$model" w4a0 "$method" --wbits 4 --abits 0
    run "$model" tensorrt "$method" --wbits 8 --abits 8 --target tensorrt
  done
done
