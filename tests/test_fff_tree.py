import pytest
import torch

from ultrafastbert.fff.tree import (
    child,
    go_right,
    n_nodes,
    path_length,
    tree_offsets,
    validate_tree_shape,
    visited_mask,
)


def test_sizes_match_the_paper_configs():
    assert n_nodes(11) == 4095 and path_length(11) == 12
    assert n_nodes(0) == 1 and path_length(0) == 1
    widths = [k * n_nodes(d) for k, d in [(3072, 0), (1536, 1), (512, 2), (256, 3), (128, 4),
                                          (64, 5), (32, 6), (16, 7), (8, 8), (4, 9), (2, 10)]]
    assert widths == [3072, 4608, 3584, 3840, 3968, 4032, 4064, 4080, 4088, 4092, 4094]


def test_heap_children_and_tie_rule():
    local = torch.tensor([0, 1, 2, 5])
    assert child(local, torch.tensor([False, True, False, True])).tolist() == [1, 4, 5, 12]
    logits = torch.tensor([-1.0, 0.0, -0.0, 1e-30, float("nan")])
    assert go_right(logits).tolist() == [False, False, False, True, False]


@pytest.mark.parametrize("n_trees,depth", [(0, 1), (1, -1), (1, 21), (1.5, 2), (True, 1)])
def test_validation_names_the_field(n_trees, depth):
    with pytest.raises(ValueError, match="n_trees|depth"):
        validate_tree_shape(n_trees, depth)


def test_visited_mask_marks_exactly_the_path():
    nodes = torch.tensor([[[0, 2, 5]], [[0, 1, 3]]])
    mask = visited_mask(nodes, 1, 2)
    assert mask.sum(1).tolist() == [3, 3]
    assert mask[0].nonzero().flatten().tolist() == [0, 2, 5]
    assert tree_offsets(3, 2).tolist() == [0, 7, 14]
