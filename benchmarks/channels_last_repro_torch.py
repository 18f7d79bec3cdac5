"""channels-last, in pure PyTorch: whose bug was the heap corruption? (imports no edgetrain)

The same network, shapes and steps as `benchmarks/channels_last_repro.py` (which goes through
edgetrain): a width-4, depth-2 K-M ResNet on 1x8x8 inputs (stem conv3x3 + BN + ReLU; a
pre-activation block 4->4; a pre-activation block 4->8 with stride 2 and a 1x1 projection
shortcut), the DGL head on its 8x4x4 output (conv3x3, ReLU, 2x2 average pool, BN, flatten,
linear), end-to-end cross-entropy with each residue's mean square taken as a detached
statistic, SGD (lr 0.05, momentum 0.9, weight decay 2e-4, cosine over 100 steps), batch 50
of seeded random inputs, 30 steps, one intra-op thread. PART says what is channels-last, as
there: none, head, body (stem and blocks) or all. `--steps N` runs longer; `--bf16` runs the
forward under CPU autocast in bfloat16. PART `minimal` is the one layer that does it: the
weight gradient of a channels-last 1x1 stride-2 Conv2d, 4 -> 8 channels, on 50x4x8x8 inputs
(the second block's projection shortcut), `--steps` times.

Verdict (torch 2.14.1+cu130, x86_64, AMD EPYC with avx512f/avx512_bf16, one thread): clean
on the CPU's own AVX-512 kernels (also under MALLOC_CHECK_=3 MALLOC_PERTURB_=165); aborts
("corrupted double-linked list", "free(): invalid size", SIGSEGV) on every run with oneDNN
limited to its AVX2 kernels (ONEDNN_MAX_CPU_ISA=AVX2, what a CPU without AVX-512 runs),
`body`, `all` and `minimal` alike, while ATEN_CPU_CAPABILITY=avx2 alone stays clean. A bug
of PyTorch's oneDNN convolution backward (weights), not of edgetrain: edgetrain keeps such
CPUs in the default format (`edgetrain.method.precision.memory_format`).

usage: python benchmarks/channels_last_repro_torch.py [none|head|body|all|minimal]
       [--steps N] [--bf16]
(exit 0 and "no crash": nothing went wrong; a heap corruption aborts the process)
"""
import argparse
import math

import torch
from torch import nn
import torch.nn.functional as F


class PreActBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.branch = nn.Sequential(
            nn.BatchNorm2d(c_in), nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
            nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False))
        self.shortcut = (nn.Identity() if stride == 1 and c_in == c_out
                         else nn.Conv2d(c_in, c_out, 1, stride, bias=False))

    def forward(self, x):
        r = self.branch(x)
        return self.shortcut(x) + r, r


def network(width: int = 4):
    stem = nn.Sequential(nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                         nn.ReLU(inplace=True))
    blocks = nn.ModuleList([PreActBlock(width, width, 1), PreActBlock(width, 2 * width, 2)])
    c = 2 * width
    head = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2),
                         nn.BatchNorm2d(c), nn.Flatten(), nn.Linear(c * 2 * 2, 10))
    return stem, blocks, head


def step(stem, blocks, head, opt, x, y, bf16: bool) -> float:
    ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    with ctx:
        z = stem(x)
        cost = torch.zeros(())
        for blk in blocks:
            z, r = blk(z)
            with torch.no_grad():
                cost += r.float().pow(2).mean()
            del r
        logits = head(z)
    loss = F.cross_entropy(logits.float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def minimal(steps: int) -> None:
    """The weight gradient of one channels-last 1x1 stride-2 convolution, 4 -> 8 channels."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 4, 1, 1, generator=g).to(memory_format=torch.channels_last)
    w.requires_grad_(True)
    for _ in range(steps):
        x = torch.randn(50, 4, 8, 8, generator=g).to(memory_format=torch.channels_last)
        F.conv2d(x, w, stride=2).square().mean().backward()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", nargs="?", default="body", choices=["none", "head", "body", "all", "minimal"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--bf16", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if a.part == "minimal":
        minimal(max(a.steps, 300))
        print(f"minimal: {max(a.steps, 300)} steps, no crash (torch {torch.__version__}, "
              f"{torch.backends.cpu.get_cpu_capability()})")
        return
    stem, blocks, head = network()
    if a.part in ("head", "all"):
        head.to(memory_format=torch.channels_last)
    if a.part in ("body", "all"):
        stem.to(memory_format=torch.channels_last)
        blocks.to(memory_format=torch.channels_last)
    params = [p for m in (stem, blocks, head) for p in m.parameters()]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=2e-4)
    for m in (stem, blocks, head):
        m.train()
    g = torch.Generator().manual_seed(0)
    for i in range(a.steps):
        for group in opt.param_groups:  # cosine over 100 steps, as the edgetrain reproducer
            group["lr"] = 0.5 * 0.05 * (1 + math.cos(math.pi * min(i, 100) / 100))
        x, y = torch.randn(50, 1, 8, 8, generator=g), torch.randint(0, 10, (50,), generator=g)
        loss = step(stem, blocks, head, opt, x, y, a.bf16)
    print(f"{a.part}: {a.steps} steps, no crash (last loss {loss:.4f}, torch {torch.__version__},"
          f" {torch.backends.cpu.get_cpu_capability()})")


if __name__ == "__main__":
    main()
