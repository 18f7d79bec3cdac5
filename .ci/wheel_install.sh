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
"$v/edgetrain" train --data digits --mode sequential --epochs 1 --device-profile raspberry-pi-4-4gb \
  --out run --no-progress
"$v/python" -c "
from sklearn.datasets import load_digits
from PIL import Image
import numpy as np
img = load_digits().images[0]
Image.fromarray((img * 255 / 16).astype(np.uint8)).save('digit.png')"
"$v/edgetrain" predict run digit.png
"$v/edgetrain" export run --out model.onnx
ls -l model.onnx
echo "wheel install check: ok"
