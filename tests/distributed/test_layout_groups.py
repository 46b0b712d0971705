"""Our rank → (tp, dp, pp) math agrees with the groups Megatron-Core itself creates."""

import pytest
import torch.distributed as dist

from m2megatron.parallel import Layout, build_groups

pytestmark = pytest.mark.distributed


def _group_ranks(tp, pp, loss_group_size):
    layout = Layout(world_size=dist.get_world_size(), tensor_parallel=tp, pipeline_parallel=pp,
                    loss_group_size=loss_group_size)
    groups = build_groups(layout)
    return {
        "coords": (groups.tp_rank, groups.dp_rank, groups.pp_rank),
        "tp": dist.get_process_group_ranks(groups.tp),
        "dp": dist.get_process_group_ranks(groups.dp),
        "pp": dist.get_process_group_ranks(groups.pp),
        "loss": dist.get_process_group_ranks(groups.loss),
    }


def _expected(layout: Layout, rank: int):
    def mine(groups):
        (g,) = [g for g in groups if rank in g]
        return g
    return {"coords": layout.coordinates(rank), "tp": mine(layout.tp_groups()), "dp": mine(layout.dp_groups()),
            "pp": mine(layout.pp_groups()), "loss": mine(layout.loss_groups())}


@pytest.mark.parametrize("world,tp,pp,g", [
    (4, 1, 1, None), (4, 2, 1, None), (4, 1, 2, None), (4, 2, 2, None), (4, 1, 1, 2), (4, 4, 1, None),
    (8, 2, 2, None), (8, 2, 1, 2), (8, 1, 2, 2), (8, 1, 1, 4), (8, 4, 2, None), (8, 1, 4, 1),
])
def test_layout_matches_megatron_groups(dist_pool, world, tp, pp, g):
    results = dist_pool(world).run(_group_ranks, tp, pp, g)
    layout = Layout(world_size=world, tensor_parallel=tp, pipeline_parallel=pp, loss_group_size=g)
    for rank, got in enumerate(results):
        assert got == _expected(layout, rank), f"rank {rank}"
