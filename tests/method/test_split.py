import pytest
import torch

from edgetrain.errors import UserError
from edgetrain.method.split import block_activation_bytes, split_balanced, split_depth, split_memory
from edgetrain.models import create_model


def test_split_depth():
    assert split_depth(10, 4) == [0, 3, 6, 8, 10]
    assert split_depth(4, 4) == [0, 1, 2, 3, 4]
    assert split_depth(5, 1) == [0, 5]


@pytest.mark.parametrize("k", [0, 11])
def test_split_depth_rejects_bad_k(k):
    with pytest.raises(UserError, match="--modules"):
        split_depth(10, k)


def test_split_balanced_minimises_heaviest_run():
    costs = [10, 1, 1, 1, 1, 10]
    b = split_balanced(costs, 3)
    runs = [sum(costs[a:c]) for a, c in zip(b[:-1], b[1:])]
    assert max(runs) == 10 and b[0] == 0 and b[-1] == 6


def test_memory_split_front_loads_fewer_blocks_on_resnet():
    net = create_model("resnet20", (3, 32, 32), 10, width=4)
    x = torch.randn(4, 3, 32, 32)
    costs = block_activation_bytes(net, x)
    assert costs[0] > costs[-1]  # early, high-resolution blocks are heavier
    b = split_memory(net, 3, x)
    assert b[1] - b[0] <= b[3] - b[2]
    runs = [sum(costs[a:c]) for a, c in zip(b[:-1], b[1:])]
    assert max(runs) - min(runs) <= max(costs)
