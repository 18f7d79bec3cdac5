"""Why CPU modules are not channels-last yet: a reproducer to rerun after a torch upgrade.

With torch 2.14.1 (CPU, x86_64 with AVX-512 BF16, one intra-op thread) a width-4 kmresnet
on digits (batch 50) trained with its blocks in channels-last format aborts in the backward
with "corrupted double-linked list" / "free(): invalid next size" within 30 steps, while the
same network in the default (contiguous) format, or with only its head channels-last, runs.
Single layers (BatchNorm2d, Conv2d 1x1/3x3 stride 1/2, pooling) with the same shapes did not
reproduce it. Channels-last made a module's step 0.83x-0.87x as long
(benchmarks/results/speedups*.md), so it is worth adopting once this passes.

Attributed (#29): `benchmarks/channels_last_repro_torch.py` (no edgetrain) aborts the same way
with oneDNN on its AVX2 kernels (ONEDNN_MAX_CPU_ISA=AVX2, a CPU without AVX-512), down to one
layer (`minimal`: the weight gradient of a channels-last 1x1 stride-2 conv, 4 -> 8 channels):
a PyTorch/oneDNN bug. Modules are now channels-last on AVX-512 CPUs only.

usage: python benchmarks/channels_last_repro.py [none|head|body|all]   (exit 0: no crash)
"""
import sys

import torch

from edgetrain.config import RunConfig
from edgetrain.method.loop import make_trainer, train_step
from edgetrain.method.stage import whole_network
from edgetrain.regimes.run import build_run


def main(part: str) -> None:
    torch.set_num_threads(1)
    cfg = RunConfig(data="digits", train_size=100, model="kmresnet", width=4, depth=2,
                    modules=2, batch_size=50, augment=False, mode="e2e", epochs=2, device="cpu")
    run = build_run(cfg)
    st = whole_network(run.net, run.stages[-1].head)
    if part in ("head", "all"):
        st.head.to(memory_format=torch.channels_last)
    if part in ("body", "all"):
        for b in st.blocks:
            b.to(memory_format=torch.channels_last)
        if st.stem is not None:
            st.stem.to(memory_format=torch.channels_last)
    tr = make_trainer(st, cfg, 0, 1, 100, transport=False)
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        x, y = torch.randn(50, 1, 8, 8, generator=g), torch.randint(0, 10, (50,), generator=g)
        train_step([tr], x, y, 0.0, "mean")
    print(f"{part}: 30 steps, no crash")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "body")
