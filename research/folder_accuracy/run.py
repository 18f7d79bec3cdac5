"""A run from an image folder (PNG, written from Fashion-MNIST) against the same run from
`--data fashion-mnist`, paired over seeds. Resumes nothing: one call, rows written per seed.

usage: python -m research.folder_accuracy.run [--out research/folder_accuracy/results] [--seeds 0,1,2,3,4]
       [--train-size 5000] [--test-size 2000] [--threads 1]
Accuracy is not affected by load: it may run beside other work (nice it).
"""
import argparse
from pathlib import Path

from research.folder_accuracy.folder_accuracy import run_folder_accuracy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="research/folder_accuracy/results")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--train-size", type=int, default=5000)
    ap.add_argument("--test-size", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--stem", default="folder_accuracy")
    a = ap.parse_args()
    res = run_folder_accuracy(Path(a.out), [int(s) for s in a.seeds.split(",")], a.train_size,
                              a.test_size, a.threads, a.stem,
                              arm={"epochs": a.epochs} if a.epochs else None)
    print(open(res["md_path"]).read())


if __name__ == "__main__":
    main()
