"""Data: the data set registry (`DATASETS`, written by `@DATASETS.register`), the built-in
sets (`edgetrain.data.builtin`), image folders (`edgetrain.data.folder`), the packed store
every split streams from (`edgetrain.data.pack`), deterministic splits
(`edgetrain.data.splits`), a run's stored preprocessing (`edgetrain.data.preprocess`) and
batches (`edgetrain.data.batches`).

Importing this package imports no torch: the built-in sets (which do) register themselves
the first time the registry is read (`names`, `lookup`), so that decoding an image
(`edgetrain.data.folder`) works where PyTorch is not installed (`edgetrain predict FILE.onnx`).
"""
from edgetrain.registry import Registry


class DatasetRegistry(Registry):
    """The data set registry; reading it first registers the built-in sets."""

    def names(self) -> list[str]:
        load_builtins()
        return super().names()

    def lookup(self, name: str):
        load_builtins()
        return super().lookup(name)


def load_builtins() -> None:
    """Register the built-in sets (imports torch and torchvision)."""
    from edgetrain.data import builtin  # noqa: F401


DATASETS = DatasetRegistry("dataset")


def list_datasets() -> list[str]:
    return DATASETS.names()
