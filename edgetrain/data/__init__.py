"""Data: the data set registry (`DATASETS`, written by `@DATASETS.register`), the built-in
sets (`edgetrain.data.builtin`), image folders (`edgetrain.data.folder`), the packed store
every split streams from (`edgetrain.data.pack`), deterministic splits
(`edgetrain.data.splits`), a run's stored preprocessing (`edgetrain.data.preprocess`) and
batches (`edgetrain.data.batches`)."""
from edgetrain.registry import Registry

DATASETS = Registry("dataset")


def list_datasets() -> list[str]:
    return DATASETS.names()


# populate the registry
from edgetrain.data import builtin  # noqa: E402,F401
