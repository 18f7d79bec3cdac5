"""bf16 against fp32 (`--precision`): activation memory, step time and accuracy.

The same as `edgetrain bench precision`.

usage: python benchmarks/precision.py [--out benchmarks/results] [--seeds 5] [--threads 2]
       [--quick] [--size full|small] [--parts memory,accuracy,auto]

Memory and step time come from fresh child processes; accuracy is digits and Fashion-MNIST
over the seeds (mean, std, paired bf16 - fp32). Run it on a quiet machine. The accuracy
part was sized for ~15 min on 2 cores in fp32 (not timed); on a CPU without native bf16
convolutions (no AVX-512 BF16 / AMX: oneDNN bf16 unsupported, as on the development machine)
PyTorch runs bf16 convolutions on its slow reference kernels (~30x slower steps measured on
resnet8 there), so the bf16 half takes far longer: lower --seeds first. `--quick` is a
smoke check of the pipeline (tiny configurations, one seed) and writes
precision-quick.{json,md} instead.
"""
import argparse
from pathlib import Path

from edgetrain.bench.precision import run_precision


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--seeds", type=int, default=None, help="default 5 (1 with --quick)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--size", choices=["full", "small"], default="full",
                    help="small: resnet20 and digits only, for a CPU without native bf16")
    ap.add_argument("--parts", default="memory,accuracy", help="memory (and step time), accuracy, auto (--precision auto vs fp32 on ResNet-18 3x32x32)")
    a = ap.parse_args()
    if a.seeds is not None and a.seeds < 1 or a.threads < 1:
        ap.error("--seeds and --threads must be >= 1")
    res = run_precision(Path(a.out), seeds=a.seeds, quick=a.quick, threads=a.threads,
                        size=a.size, parts=tuple(a.parts.split(",")))
    print(open(res["md_path"]).read())


if __name__ == "__main__":
    main()
