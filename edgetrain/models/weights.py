"""Pretrained weights for `--init`: read a source, map its key names, load it into a network.

A source is a safetensors file, a PyTorch state-dict file (read with
`torch.load(weights_only=True)`, which refuses pickled code), or an edgetrain run directory.
Key names are mapped onto edgetrain's `Network` (`stem.*`, `blocks.N.*`): torchvision ResNet
names (`conv1`, `bn1`, `layerL.i.*`) onto the torchvision adapters of `tv_resnet`, an
edgetrain run's module files (`stem.*`, stage-local `blocks.j.*`, `head.*`) by global block
index. The source's own classifier (`fc.*` of a torchvision model) is skipped by design.

This file reads weights and builds the mapping; it does not decide which modules train
(`edgetrain.regimes.run`) and never downloads anything.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import hashlib
import json
from pathlib import Path
import pickle
import re

import torch
from torch import nn

from edgetrain.errors import UserError, first_line
from edgetrain.storage.codec import read_tensors

TV_LAYER = re.compile(r"^layer(\d+)\.(\d+)\.(.*)$")
TV_STEM = {"conv1.": "stem.0.", "bn1.": "stem.1."}
SHOW = 3  # how many bad keys an error names


@dataclass
class InitSource:
    """Weights read from `--init`, keyed as edgetrain's network (`stem.*`, `blocks.N.*`) and
    heads (`heads.K.*`, only from an edgetrain run)."""

    path: str
    sha256: str
    kind: str  # "torchvision", "edgetrain" (a Network state dict) or "run"
    weights: dict[str, torch.Tensor]
    skipped: list[str] = field(default_factory=list)  # the source's classifier, by design
    run_layout: dict | None = None  # a run source: {"bounds": [...], "class_names": [...]}


def file_sha256(path: Path) -> str:
    """sha256 of a file (of every module file, in order, for a run directory)."""
    h = hashlib.sha256()
    paths = sorted((path / "modules").glob("*.safetensors")) if path.is_dir() else [path]
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def read_state_file(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file or of a weights-only PyTorch state dict.

    Raises:
        UserError: not a file, a pickle holding code or objects, not a dict of tensors.
    """
    if not path.is_file():
        raise UserError(f"--init {path}: no such file or run directory")
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) >= 9 and head[8:9] == b"{":  # safetensors: u64 header length, then JSON
        return read_tensors(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as e:
        raise UserError(f"--init {path}: refused by torch.load(weights_only=True) (it holds "
                        f"code or objects, or is not a state dict): {first_line(e)}") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd or not all(
            isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items()):
        raise UserError(f"--init {path}: not a state dict (a dict of named tensors)")
    return sd


def map_torchvision(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """torchvision ResNet keys -> edgetrain adapter keys; returns (mapped, skipped fc keys).
    Blocks are numbered across layer1..layer4 in order."""
    layers: dict[int, set[int]] = {}
    for k in sd:
        m = TV_LAYER.match(k)
        if m:
            layers.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    offset, start = 0, {}
    for layer in sorted(layers):
        start[layer] = offset
        offset += max(layers[layer]) + 1
    out, skipped = {}, []
    for k, v in sd.items():
        m = TV_LAYER.match(k)
        stem = next((new for old, new in TV_STEM.items() if k.startswith(old)), None)
        if m:
            g = start[int(m.group(1))] + int(m.group(2))
            out[f"blocks.{g}.block.{m.group(3)}"] = v
        elif stem:
            out[stem + k.split(".", 1)[1]] = v
        elif k.startswith("fc."):
            skipped.append(k)
        else:
            out[k] = v  # unexpected: reported by the strict check
    return out, skipped


def is_torchvision(sd: dict) -> bool:
    return any(k.startswith("conv1.") for k in sd) and any(TV_LAYER.match(k) for k in sd)


def read_run(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The weights of a finished edgetrain run, as network keys plus `heads.K.*`."""
    cfg_path, metrics_path = path / "config.json", path / "metrics.json"
    if not cfg_path.is_file() or not metrics_path.is_file():
        raise UserError(f"--init {path}: a directory, but not a finished edgetrain run "
                        "(config.json and metrics.json)")
    metrics = json.loads(metrics_path.read_text())
    bounds = [int(b) for b in metrics["bounds"]]
    out = {}
    for k, (a, _b) in enumerate(zip(bounds[:-1], bounds[1:])):
        sd = read_tensors(path / "modules" / f"{k:02d}.safetensors",
                          lambda n: not n.startswith("optim."))
        for name, v in sd.items():
            top, rest = name.split(".", 1)
            if top == "blocks":
                j, tail = rest.split(".", 1)
                out[f"blocks.{a + int(j)}.{tail}"] = v
            elif top == "head":
                out[f"heads.{k}.{rest}"] = v
            else:
                out[name] = v
    return out, {"bounds": bounds}


def read_source(path: str | Path) -> InitSource:
    """Read `--init` PATH (a file or a run directory) into edgetrain's key names.

    Raises:
        UserError: a missing path, a refused pickle, anything that is not a state dict.
    """
    p = Path(path)
    if p.is_dir():
        weights, layout = read_run(p)
        return InitSource(str(p), file_sha256(p), "run", weights, run_layout=layout)
    sd = read_state_file(p)
    if is_torchvision(sd):
        weights, skipped = map_torchvision(sd)
        return InitSource(str(p), file_sha256(p), "torchvision", weights, skipped)
    return InitSource(str(p), file_sha256(p), "edgetrain", dict(sd))


def check_torchvision_input(src: InitSource, model: str, input_shape) -> None:
    """torchvision weights were trained on 3-channel images through the ImageNet stem."""
    c, h, w = input_shape
    if src.kind == "torchvision" and (c != 3 or min(h, w) < 64 or not model.startswith("resnet")):
        raise UserError(f"--init {src.path}: torchvision ResNet weights need --model resnet18/"
                        f"50/101/152 with 3 input channels and the ImageNet stem (inputs of 64 "
                        f"px or more); this run has --model {model} and {c}x{h}x{w} inputs")


def match(target: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]
          ) -> tuple[dict, list[str], list[str], list[str]]:
    """(loadable, missing, unexpected, mis-shaped) of `weights` against `target`'s keys."""
    missing = [k for k in target if k not in weights]
    unexpected = [k for k in weights if k not in target]
    shaped = [f"{k} {tuple(weights[k].shape)} vs {tuple(target[k].shape)}" for k in target
              if k in weights and weights[k].shape != target[k].shape]
    ok = {k: v for k, v in weights.items() if k in target and v.shape == target[k].shape}
    return ok, missing, unexpected, shaped


def describe(missing: list[str], unexpected: list[str], shaped: list[str]) -> str:
    """The first few bad keys of each kind, on one line."""
    parts = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shaped)):
        if keys:
            more = f" (+{len(keys) - SHOW} more)" if len(keys) > SHOW else ""
            parts.append(f"{len(keys)} {what}: {', '.join(keys[:SHOW])}{more}")
    return "; ".join(parts)


def load_into(module: nn.Module, weights: dict[str, torch.Tensor], strict: bool, path: str
              ) -> dict:
    """Copy `weights` into `module` (no autograd); strict: every key must match exactly.

    Returns:
        {"loaded": n, "missing": [...], "unexpected": [...], "mis_shaped": [...]} (the rest,
        when not strict).
    Raises:
        UserError: strict and any key missing, unexpected or mis-shaped (the first few named).
    """
    target = module.state_dict()
    ok, missing, unexpected, shaped = match(target, weights)
    if strict and (missing or unexpected or shaped):
        raise UserError(f"--init {path} does not fit this network ({describe(missing, unexpected, shaped)}); "
                        "check --model/--width/--depth, or --no-init-strict to load what matches")
    with torch.no_grad():
        for k, v in ok.items():
            target[k].copy_(v.to(target[k].dtype))
    return {"loaded": len(ok), "missing": missing, "unexpected": unexpected,
            "mis_shaped": shaped}
