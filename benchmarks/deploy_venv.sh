#!/usr/bin/env bash
# A device without PyTorch: `edgetrain predict MODEL.onnx` in a fresh venv holding only
# onnxruntime, numpy, Pillow and click (+ edgetrain itself with --no-deps), compared with
# `edgetrain predict RUN_DIR` of the current environment on the same images.
#
#   benchmarks/deploy_venv.sh RUN_DIR MODEL.onnx IMAGE_DIR
#
# Needs network access to PyPI (pip). Exit 0 when torch is absent from the venv and the
# two predictions agree on every image; prints the seconds taken.
set -euo pipefail
run_dir=$1; model=$2; images=$3
repo=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
start=$(date +%s)
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q onnxruntime numpy Pillow click  # the documented command, part 1
"$tmp/venv/bin/pip" install -q --no-deps "$repo"                # part 2: edgetrain, no torch
if "$tmp/venv/bin/python" -c "import torch" 2>/dev/null; then
    echo "torch is importable in the venv: not a torch-free install" >&2; exit 1
fi
set +e
(cd "$tmp" && venv/bin/edgetrain train --epochs 1 2> "$tmp/train.err"); rc=$?
set -e
if [ "$rc" != 2 ] || ! grep -q "this command needs PyTorch" "$tmp/train.err"; then
    echo "edgetrain train without torch: exit $rc, not one line and exit 2" >&2; exit 1
fi
(cd "$tmp" && venv/bin/edgetrain predict "$(realpath "$model")" "$(realpath "$images")" --json --top-k 1) > "$tmp/file.json"
PYTHONPATH=$repo python3 -m edgetrain.cli predict "$run_dir" "$images" --json --top-k 1 > "$tmp/run.json"
python3 - "$tmp/file.json" "$tmp/run.json" <<'PY'
import json, os, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
top = lambda d: {os.path.basename(p["file"]): p["top"][0]["class"] for p in d["predictions"]}
ta, tb = top(a), top(b)
same = sum(ta[f] == tb[f] for f in tb)
print(f"venv without torch: predict MODEL.onnx agrees with predict RUN_DIR on {same}/{len(tb)} images")
sys.exit(0 if same == len(tb) == len(ta) else 1)
PY
echo "took $(( $(date +%s) - start )) s"
