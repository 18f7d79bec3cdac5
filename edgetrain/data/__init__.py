"""Data: the data set registry (`DATASETS`, written by `@DATASETS.register`), the built-in
sets (`edgetrain.data.builtin`), deterministic splits (`edgetrain.data.splits`) and batches
(`edgetrain.data.batches`)."""
from edgetrain.registry import Registry

DATASETS = Registry("dataset")


def list_datasets() -> list[str]:
    return DATASETS.names()


# populate the registry
from edgetrain.data import builtin  # noqa: E402,F401
