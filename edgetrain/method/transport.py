"""The kinetic-energy (transport) cost of a module and the tau schedules.

Scaling (documented, the reference code's choice by default):
  `mean`:   W = sum over the module's blocks of mean(r**2), the mean taken over every
            element of the batch (B * C * H * W numbers). Independent of the batch size
            and of the feature-map size.
  `sample`: W = sum over blocks of mean over the batch of ||r_i||^2 (squared norm of one
            sample's residue); this is the paper's formula (10) per sample, and grows with
            the feature size, so it needs a tau larger by roughly C * H * W.
The module loss is CE + W / (2 tau_k) (constant and midpoint schedules) or, with the
method of multipliers of Appendix D, lambda * CE + W with lambda = 2 tau grown by
h * CE every s steps.
"""
from __future__ import annotations

import torch


def transport_cost(residues: list[torch.Tensor], scaling: str = "mean") -> torch.Tensor:
    """Kinetic energy of one module from its blocks' residues (see the module docstring).

    At least float32: a bf16 / fp16 residue (`--precision`) goes through
    `LowPrecisionEnergy`, which squares and averages it in float32 but saves the residue in
    its own dtype."""
    if not residues:
        return torch.zeros(())
    if any(r.dtype in (torch.bfloat16, torch.float16) for r in residues):
        return sum(LowPrecisionEnergy.apply(r, scaling) for r in residues)
    if scaling == "mean":
        return sum(r.pow(2).mean() for r in residues)
    if scaling == "sample":
        return sum(r.pow(2).flatten(1).sum(1).mean() for r in residues)
    raise ValueError(f"unknown transport scaling {scaling!r}")


def _energy_scale(r: torch.Tensor, scaling: str) -> float:
    """c in dW/dr = c * r: 2 / numel for `mean`, 2 / batch for `sample`."""
    if scaling == "mean":
        return 2.0 / r.numel()
    if scaling == "sample":
        return 2.0 / r.shape[0]
    raise ValueError(f"unknown transport scaling {scaling!r}")


class LowPrecisionEnergy(torch.autograd.Function):
    """`transport_cost([r])` of a low-precision residue, computed in float32.

    `r.float().pow(2)` would save a float32 copy of r for backward (twice r's bytes); this
    function saves r itself and returns the float32 energy; dW/dr = c * r (`_energy_scale`),
    in r's dtype.
    """

    @staticmethod
    def forward(ctx, r: torch.Tensor, scaling: str) -> torch.Tensor:
        ctx.c = _energy_scale(r, scaling)
        ctx.save_for_backward(r)
        return transport_cost([r.float()], scaling)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (r,) = ctx.saved_tensors
        return r * (g * ctx.c).to(r.dtype), None


class DeltaEnergy(torch.autograd.Function):
    """Transport cost of one block whose residue is exactly its displacement, r = out - x.

    `transport_cost([r])` saves r for backward (r.pow(2)), one extra feature map per block
    that nothing else keeps. This function saves only `x` and `out`, storages the block's
    neighbours already save (the block's first layer saves its input, the next block's
    first layer saves this block's output), and rebuilds r = out - x in backward:
        W = c/2 * sum(r**2),  dW/dout = c * r,  dW/dx = -c * r,
    so through out = x + r(x) the gradient reaching x is c * r * dr/dx = dW/dx, and every
    parameter of the block receives c * r * dr/dtheta: the same gradients as `transport_cost`
    (up to the rounding of out - x). `r` may be a reshaped view of out - x (same elements in
    the same order, e.g. a (B, H, W, C) map against (B, H*W, C) tokens).

    Use: `DeltaEnergy.apply(x, out, r, scaling)` -> the block's energy (a scalar), the value
    of `transport_cost([r], scaling)`; no gradient flows into `r`. With `value=False` the
    forward returns zero and skips the reduction (and its residue-sized temporary), saving
    the same tensors: for a recomputation whose output is discarded (`--recompute`).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, out: torch.Tensor, r: torch.Tensor,
                scaling: str, value: bool = True, into_residue: bool = False) -> torch.Tensor:
        if x.shape != out.shape or r.numel() != out.numel():
            raise ValueError(f"DeltaEnergy needs out - x == r: shapes {tuple(x.shape)}, "
                             f"{tuple(out.shape)}, residue {tuple(r.shape)}")
        ctx.c = _energy_scale(r, scaling)
        # float32 only: in bf16 / fp16 the default path's rounding is what the tests pin
        ctx.into_residue = into_residue and r.shape == out.shape and r.dtype == torch.float32
        ctx.save_for_backward(x, out)
        if not value:
            return torch.zeros((), dtype=torch.float32, device=r.device)
        return transport_cost([r], scaling)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, out = ctx.saved_tensors
        d = out - x  # the residue, rebuilt; with its negation, the only temporaries
        d.mul_(g * ctx.c)  # dW/dout = c * r * g, in place
        if ctx.into_residue and ctx.needs_input_grad[2]:
            # out = x + r: c * r * g into out and -c * r * g into x cancel on the identity,
            # so the same gradients reach every parameter and x when c * r * g goes into r
            # alone: one temporary instead of two (rounding differs in the last bits)
            return None, None, d, None, None, None
        grad_x = torch.neg(d) if ctx.needs_input_grad[0] else None
        return grad_x, d if ctx.needs_input_grad[1] else None, None, None, None, None


def block_energy(x: torch.Tensor, out: torch.Tensor, r: torch.Tensor, is_delta: bool,
                 scaling: str, value: bool = True, into_residue: bool = False) -> torch.Tensor:
    """Differentiable transport cost of one block: `DeltaEnergy` when the block declares
    r == out - x (`residue_is_delta`), else `transport_cost([r])`, which saves r (and is
    computed in full even with `value=False`: its backward needs what pow saves)."""
    if is_delta:
        return DeltaEnergy.apply(x, out, r, scaling, value, into_residue)
    return transport_cost([r], scaling)


def tau_for_module(k: int, n_modules: int, tau: float, schedule: str) -> float:
    """tau_k for module k (0-based): `constant` tau; `midpoint` doubles it for the second
    half, modules k >= ceil(K/2) (for K = 4: tau, tau, 2tau, 2tau as in the paper's Table 1)."""
    if schedule == "midpoint" and k >= (n_modules + 1) // 2:
        return 2.0 * tau
    return tau


class LossWeighting:
    """Combines cross-entropy and transport for one module and carries the tau state.

    Constant/midpoint: total = CE + W / (2 tau). Multipliers (Appendix D): total =
    lam * CE + W, and every `s` steps lam += h * CE of the next batch.
    """

    def __init__(self, transport: bool, tau: float, schedule: str, h: float = 1.0,
                 s: int = 50, lambda1: float = 1.0):
        self.transport, self.tau, self.schedule = transport, tau, schedule
        self.h, self.s = h, s
        self.lam = lambda1
        self.step = 0
        self._grow_next = False

    def combine(self, ce: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if not self.transport:
            return ce
        if self.schedule != "multipliers":
            return ce + w / (2.0 * self.tau)
        if self._grow_next:
            self.lam += self.h * float(ce.detach())
            self._grow_next = False
        return self.lam * ce + w

    def after_step(self) -> None:
        self.step += 1
        if self.transport and self.schedule == "multipliers" and self.step % self.s == 0:
            self._grow_next = True

    @property
    def effective_tau(self) -> float:
        """The tau in force: lam / 2 under the multipliers (lam = 2 tau)."""
        return self.lam / 2.0 if self.schedule == "multipliers" else self.tau

    def state_dict(self) -> dict:
        return {"tau": self.tau, "lam": self.lam, "step": self.step, "grow_next": self._grow_next}

    def load_state_dict(self, d: dict) -> None:
        self.tau, self.lam, self.step = float(d["tau"]), float(d["lam"]), int(d["step"])
        self._grow_next = bool(d["grow_next"])
