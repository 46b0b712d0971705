"""runtime.param_attributes: Megatron's TP attributes follow our sharding table (models.state.tp_axis)."""

import pytest
import torch

from m2megatron.runtime.param_attributes import check_tensor_parallel_params, mark_tensor_parallel_params


def _module(**params: torch.nn.Parameter) -> torch.nn.Module:
    module = torch.nn.Module()
    for path, param in params.items():
        owner = module
        for part in path.split("__")[:-1]:
            if not hasattr(owner, part):
                owner.add_module(part, torch.nn.Module())
            owner = getattr(owner, part)
        owner.register_parameter(path.split("__")[-1], param)
    return module


def test_sharded_weights_get_the_attributes_and_replicated_ones_do_not():
    module = _module(mlp__linear_fc2__linear__weight=torch.nn.Parameter(torch.zeros(4, 2)),
                     mlp__linear_fc1__weight=torch.nn.Parameter(torch.zeros(2, 4)),
                     input_layernorm__weight=torch.nn.Parameter(torch.ones(4)))
    mark_tensor_parallel_params(module)
    fc2, fc1 = module.mlp.linear_fc2.linear.weight, module.mlp.linear_fc1.weight
    assert (fc2.tensor_model_parallel, fc2.partition_dim, fc2.partition_stride) == (True, 1, 1)
    assert (fc1.tensor_model_parallel, fc1.partition_dim) == (True, 0)
    assert not getattr(module.input_layernorm.weight, "tensor_model_parallel", False)


def test_a_replicated_parameter_marked_sharded_is_a_build_error_naming_it():
    norm = torch.nn.Parameter(torch.ones(4))
    norm.tensor_model_parallel = True
    with pytest.raises(RuntimeError, match="input_layernorm.weight is replicated but marked"):
        mark_tensor_parallel_params(_module(input_layernorm__weight=norm))


def test_a_wrong_partition_dim_is_a_build_error():
    qkv = torch.nn.Parameter(torch.zeros(6, 4))
    qkv.tensor_model_parallel, qkv.partition_dim = True, 1
    with pytest.raises(RuntimeError, match="linear_qkv.weight is sharded on axis 0 but marked partition_dim=1"):
        check_tensor_parallel_params(_module(self_attention__linear_qkv__weight=qkv))
