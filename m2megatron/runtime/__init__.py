"""The stage runtime: one way to build this rank's pipeline stages and one driver of Megatron's schedules.

    stages = build_stages(cfg, groups)                 # chunks on groups.device (+ DDP, optimizer)
    result = TrainStep(stages)(mbs)                    # one whole training step (zero, fwd+bwd, check, update)
    loss = ContrastiveStep(stages)(mbs)                # its forward and backward alone
    run_schedule(stages.chunks, groups, mbs, fn, config=stages.config, seq_length=S,
                 forward_only=True, collect=True)      # eval, any PP / VP

Training, both eval launchers, encode, the checkpoint tools and the memory planner all build and run
their stages here (docs/ARCHITECTURE.md, "The runtime").
"""

from m2megatron.runtime.build import Stages, build_stage_module, build_stages, check_placement
from m2megatron.runtime.megatron_config import build_transformer_config
from m2megatron.runtime.schedule import run_schedule, stage_inputs
from m2megatron.runtime.stages import StageSpec, stage_specs
from m2megatron.runtime.train_step import ContrastiveStep, StepResult, TrainStep

__all__ = ["ContrastiveStep", "StageSpec", "Stages", "StepResult", "TrainStep", "build_stage_module", "build_stages",
           "build_transformer_config", "check_placement", "run_schedule", "stage_inputs", "stage_specs"]
