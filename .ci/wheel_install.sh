#!/usr/bin/env bash
# What a user installs: a wheel built from a clean copy of the committed tree (git archive, so
# no stale build/ files leak in), installed into a fresh venv outside the checkout, and used
# from another directory: the shipped device profiles, a one-epoch run under a device profile,
# export and predict on that run. Prints the wheel's size; fails on the first broken step.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /tmp/edgetrain-wheel.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/src" "$work/dist" "$work/user"
git -C "$repo" archive HEAD | tar -x -C "$work/src"
(cd "$work/src" && pip wheel -q --no-deps --no-build-isolation -w "$work/dist" .)
wheel=$(ls "$work"/dist/edgetrain-*.whl)
python "$repo/.ci/check_wheel.py" "$wheel"

python -m venv "$work/venv"
v="$work/venv/bin"
"$v/pip" install -q torch==2.14.1 torchvision==0.29.1
"$v/pip" install -q "${wheel}[export]"
cd "$work/user"   # not the checkout: nothing can be found relative to the repository
export EDGETRAIN_DEVICES_DIR="$work/user/profiles"

requires=$("$v/pip" show edgetrain | sed -n 's/^Requires: //p')
echo "installed edgetrain requires: $requires"
if echo "$requires" | grep -qi scipy; then echo "wheel check failed: scipy is a requirement"; exit 1; fi
"$v/python" - <<'PY'
import importlib.util, pkgutil, edgetrain, edgetrain.bench
mods = {m.name for m in pkgutil.walk_packages(edgetrain.__path__, "edgetrain.")}
research = {"accuracy", "paper_cpu", "paper_cpu_report", "investigate", "presets", "head_cost",
            "finetune", "speedups", "allocator", "folder_accuracy", "distributed", "accuracy_report"}
stray = sorted(m for m in mods if m.startswith("edgetrain.bench.") and m.split(".")[-1] in research)
assert not stray, f"research modules installed: {stray}"
assert importlib.util.find_spec("research") is None, "a research package is installed"
assert "/site-packages/" in edgetrain.__file__, edgetrain.__file__
print(f"installed package: {len(mods)} modules, none of them research")
PY

"$v/edgetrain" devices | tee devices.txt
rows=$(tail -n +2 devices.txt | grep -c shipped)
[ "$rows" -eq 6 ] || { echo "wheel check failed: $rows shipped profiles listed, not 6"; exit 1; }
"$v/edgetrain" train --config quickstart --print-config > recipe.toml  # a shipped recipe, by name
grep '^mode = "multilap"' recipe.toml
"$v/edgetrain" train --data digits --mode sequential --epochs 1 --device-profile raspberry-pi-4-4gb \
  --out run --no-progress
"$v/python" -c "
from pathlib import Path
from sklearn.datasets import load_digits
from PIL import Image
import numpy as np
Path('digits').mkdir()
for i, img in enumerate(load_digits().images[:50]):
    Image.fromarray((img * 255 / 16).astype(np.uint8)).save(f'digits/{i:03d}.png')"
"$v/edgetrain" predict run digits/000.png
"$v/edgetrain" export run --out model.onnx
ls -l model.onnx
"$v/edgetrain" predict run digits --json --top-k 1 > run.json

# A device without PyTorch: the documented torch-free install (docs/deploy.md), same wheel.
python -m venv "$work/lite"
l="$work/lite/bin"
"$l/pip" install -q onnxruntime numpy Pillow click && "$l/pip" install -q --no-deps "$wheel"
if "$l/python" -c "import torch" 2>/dev/null; then echo "wheel check failed: torch in the lite venv"; exit 1; fi
"$l/edgetrain" predict model.onnx digits --json --top-k 1 > file.json
set +e; "$l/edgetrain" train --epochs 1 2> train.err; rc=$?; set -e
[ "$rc" -eq 2 ] && [ "$(wc -l < train.err)" -eq 1 ] || { echo "wheel check failed: train without torch: exit $rc"; cat train.err; exit 1; }
python - <<'PY'
import json, os
top = lambda p: {os.path.basename(x["file"]): x["top"][0]["class"] for x in json.load(open(p))["predictions"]}
a, b = top("run.json"), top("file.json")
same = sum(a[f] == b.get(f) for f in a)
print(f"predict MODEL.onnx without torch agrees with predict RUN_DIR on {same}/{len(a)} images")
assert same == len(a) == len(b) == 50
PY
echo "wheel install check: ok"
