"""The module store: one safetensors file per module (weights and head) in RUN_DIR/modules/.

`save_module` / `load_module` write and read one module's weights. `ModuleStore` owns the
module files of an out-of-core (sequential / multilap) run: while training, module k's file
also holds its optimizer state (`optim.*` tensors), its tau state, step and history (JSON in
the safetensors metadata; with fp16 also its loss scaler's state). Loading module k through
the store unloads every other module (their tensors go to the `meta` device), and the store
counts how many modules are resident at once (`max_resident`). It does not decide when to
checkpoint (the regimes do).
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
import torch

from edgetrain import __version__
from edgetrain.errors import UserError, first_line
from edgetrain.storage.codec import (FROM_CODE, open_safetensors, read_into, read_meta,
                                     read_tensors, save_tensors, tensors_digest)


def load_optimizer_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Only the `optim.*` tensors of a module file (the weights are not read)."""
    return read_tensors(path, lambda n: n.startswith("optim."))


def module_path(run_dir: Path, k: int) -> Path:
    return Path(run_dir) / "modules" / f"{k:02d}.safetensors"


def save_module(run_dir: Path, k: int, stage: torch.nn.Module, meta: dict | None = None) -> None:
    save_tensors(module_path(run_dir, k), stage.state_dict(), meta)


def load_module(run_dir: Path, k: int, stage: torch.nn.Module) -> None:
    """Load module k's weights into `stage`. On CPU each tensor is read from the file
    straight into the parameter or buffer it belongs to (no second copy of the module)."""
    targets = stage.state_dict()
    if not all(t.device.type == "cpu" and t.is_contiguous() for t in targets.values()):
        sd = read_tensors(module_path(run_dir, k), lambda n: not n.startswith("optim."))
        try:
            stage.load_state_dict(sd)
        except RuntimeError as e:
            raise UserError(f"module {k} in {run_dir} does not match the configuration: "
                            f"{first_line(e)}") from None
        return
    path = module_path(run_dir, k)
    f, header, start = open_safetensors(path)
    with f:
        names = {n for n in header if n != "__metadata__" and not n.startswith("optim.")}
        missing, unexpected = sorted(set(targets) - names), sorted(names - set(targets))
        problem = (f"missing {missing[:3]}" if missing else
                   f"unexpected {unexpected[:3]}" if unexpected else None)
        for name, t in targets.items():
            if problem:
                break
            if FROM_CODE[header[name]["dtype"]] != t.dtype:
                problem = f"{name} is {header[name]['dtype']}, expected {t.dtype}"
                break
            try:
                read_into(f, start, header[name], t)
            except ValueError as e:
                problem = f"{name}: {e}"
        if problem:
            raise UserError(f"module {k} in {run_dir} does not match the configuration or is "
                            f"corrupt: {problem}")


def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into `optim.<param>.<name>` tensors and JSON metadata."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{name}"] = v
            else:
                scalars[f"{pid}.{name}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Inverse of `optimizer_to_tensors`: a state_dict for `Optimizer.load_state_dict`."""
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for key, v in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    groups = [{n: tuple(v) if isinstance(v, list) and n != "params" else v for n, v in g.items()}
              for g in meta["param_groups"]]  # JSON turned tuples (Adam's betas) into lists
    return {"state": state, "param_groups": groups}


class ModuleStore:
    """The module files of a run and the modules in memory: loading k unloads all others.

    Stages are built once (for a deterministic initialisation) and handed to the store,
    which writes them out and releases them; from then on `load(k)` materialises module k
    from its file and sends every other module to the `meta` device (no storage).
    `max_resident` is the largest number of modules ever resident at once after `adopt`.
    """

    def __init__(self, run_dir: Path, stages: list[torch.nn.Module], device: torch.device):
        self.run_dir, self.stages, self.device = Path(run_dir), stages, device
        self.resident: set[int] = set(range(len(stages)))
        self.max_resident = 0

    def path(self, k: int) -> Path:
        return module_path(self.run_dir, k)

    def adopt(self, write: bool) -> None:
        """Take ownership: write every module's initial file (if `write`), release all."""
        for k in range(len(self.stages)):
            if write:
                self.save(k, meta={"progress": json.dumps({"lap": -1, "epochs": 0})})
            self.release(k)

    def release(self, k: int) -> None:
        """Unload module k: its parameters and buffers lose their storage."""
        if k in self.resident:
            for p in self.stages[k].parameters():
                p.grad = None
            self.stages[k].to("meta")
            self.resident.discard(k)

    def load(self, k: int) -> torch.nn.Module:
        """Make module k the only resident module, read from its file; returns the stage."""
        for j in sorted(self.resident - {k}):
            self.release(j)
        if k not in self.resident:
            stage = self.stages[k]
            stage.to_empty(device=self.device)
            load_module(self.run_dir, k, stage)
            self.resident.add(k)
        self.max_resident = max(self.max_resident, len(self.resident))
        return self.stages[k]

    def save(self, k: int, trainer=None, meta: dict | None = None, path: Path | None = None) -> None:
        """Atomically write module k (resident) with, if given, its trainer's state, to its
        file or to `path`."""
        tensors = dict(self.stages[k].state_dict())
        meta = {"edgetrain_version": __version__, "index": str(k),
                **(meta or {})}
        if trainer is not None and trainer.opt is not None:  # None: a wholly frozen module
            opt_tensors, opt_meta = optimizer_to_tensors(trainer.opt)
            tensors.update(opt_tensors)
            meta["optimizer"] = json.dumps(opt_meta)
        if trainer is not None:
            meta["trainer"] = json.dumps({"step": trainer.step, "history": trainer.history,
                                          "weighting": trainer.weighting.state_dict()})
        if trainer is not None and getattr(trainer, "scaler", None) is not None:  # fp16: JSON
            meta["scaler"] = json.dumps(trainer.scaler.state_dict())  # scale, growth tracker
        save_tensors(path or self.path(k), tensors, meta)

    def meta(self, k: int) -> dict[str, str]:
        return read_meta(self.path(k))

    def restore_trainer(self, k: int, trainer) -> None:
        """Load optimizer, tau state, step and history saved with module k (if any)."""
        meta = self.meta(k)
        if "trainer" not in meta:
            return
        t = json.loads(meta["trainer"])
        trainer.step, trainer.history = int(t["step"]), list(t["history"])
        trainer.weighting.load_state_dict(t["weighting"])
        if getattr(trainer, "scaler", None) is not None and "scaler" in meta:
            trainer.scaler.load_state_dict(json.loads(meta["scaler"]))
        if trainer.opt is None or "optimizer" not in meta:  # a wholly frozen module
            return
        opt = {n: v.to(self.device) for n, v in load_optimizer_tensors(self.path(k)).items()}
        trainer.opt.load_state_dict(optimizer_from_tensors(opt, json.loads(meta["optimizer"])))

    def weights_digest(self, k: int) -> str:
        """Digest of module k's weights, read tensor by tensor from its file."""
        with safe_open(str(self.path(k)), "pt") as f:
            return tensors_digest(f)

    def strip(self, k: int) -> None:
        """Rewrite module k's file with weights only (the end of training)."""
        meta = self.meta(k)
        if "optimizer" not in meta:
            return
        tensors = {n: v for n, v in read_tensors(self.path(k)).items() if not n.startswith("optim.")}
        keep = {n: v for n, v in meta.items() if n not in ("optimizer", "scaler")}
        save_tensors(self.path(k), tensors, keep)
