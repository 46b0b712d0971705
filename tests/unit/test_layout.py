"""Rank → (tp, dp, pp) coordinates and group membership, without processes."""

import pytest

from m2megatron.config import ConfigError
from m2megatron.parallel import Layout

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("world,tp,pp", [(1, 1, 1), (8, 2, 2), (16, 4, 2), (256, 8, 4), (12, 2, 3)])
def test_coordinates_round_trip_and_groups_partition_the_world(world, tp, pp):
    layout = Layout(world_size=world, tensor_parallel=tp, pipeline_parallel=pp)
    for rank in range(world):
        assert layout.rank(*layout.coordinates(rank)) == rank
    for groups, size in ((layout.tp_groups(), tp), (layout.dp_groups(), world // (tp * pp)), (layout.pp_groups(), pp)):
        assert sorted(r for g in groups for r in g) == list(range(world))
        assert all(len(g) == size for g in groups)


def test_tensor_parallel_is_fastest_then_data_then_pipeline():
    layout = Layout(world_size=8, tensor_parallel=2, pipeline_parallel=2)
    assert layout.coordinates(0) == (0, 0, 0)
    assert layout.coordinates(1) == (1, 0, 0)
    assert layout.coordinates(2) == (0, 1, 0)
    assert layout.coordinates(4) == (0, 0, 1)
    assert layout.tp_groups()[0] == [0, 1]
    assert layout.dp_groups()[0] == [0, 2]
    assert layout.pp_groups()[0] == [0, 4]


def test_loss_groups_are_consecutive_dp_ranks():
    layout = Layout(world_size=16, tensor_parallel=2, pipeline_parallel=1, loss_group_size=4)
    assert layout.loss_groups()[:2] == [[0, 2, 4, 6], [8, 10, 12, 14]]
    assert len(layout.loss_groups()) == 2 * 2


def test_impossible_layouts_are_refused():
    with pytest.raises(ConfigError, match="world size 6 is not divisible"):
        Layout(world_size=6, tensor_parallel=4)
    with pytest.raises(ConfigError, match="parallel.loss_group_size: 3 does not divide"):
        Layout(world_size=8, loss_group_size=3)
