"""Device correctness without a GPU: with the `meta` device standing in for the accelerator (tests/standin.py),
nothing of the model, its batches or the tensors handed to torch.distributed may stay on the host.

Each body runs in a fresh process as rank r of a fake N-rank world, visiting the ranks that hold every
kind of stage: first, middle and last pipeline stages, both TP ranks, and virtual-stage chunks.
"""

from __future__ import annotations

import pytest
import torch

from tests.standin import DEVICE, join_fake_world, recording, run_in_fresh_process

pytestmark = pytest.mark.unit

TINY = ["--model.num_layers=4", "--model.max_text_len=8", "--train.micro_batch_size=2", "--data.language=en"]
LAYOUTS = {  # name: (world size, overrides)
    "tp2-pp2": (4, ["--parallel.tensor_parallel=2", "--parallel.pipeline_parallel=2"]),
    "pp4": (4, ["--parallel.pipeline_parallel=4"]),
    "pp2-vp2": (4, ["--parallel.pipeline_parallel=2", "--parallel.virtual_pipeline=2",
                    "--train.global_batch_size=8"]),
}


def _off_device(named_tensors) -> list[str]:
    return [f"{name}: {t.device}" for name, t in named_tensors if t.device.type != DEVICE.type]


def _build_every_rank(world: int, overrides: list[str]) -> dict:
    """Build the training stages of every rank of the layout; list what is not on the runtime device."""
    from m2megatron.config import load_config
    from m2megatron.parallel import initialize
    from m2megatron.runtime import build_stages

    cfg = load_config(overrides=TINY + overrides)
    offenders, kinds = [], set()
    for rank in range(world):
        join_fake_world(rank, world)
        groups = initialize(cfg.parallel)
        assert groups.device == DEVICE
        stages = build_stages(cfg, groups)
        for spec, module, chunk in zip(stages.specs, stages.modules, stages.chunks):
            kinds.add(("first" if spec.pre_process else "last" if spec.post_process else "middle",
                       groups.tp_rank, len(stages.specs)))
            offenders += [f"rank {rank} stage {spec.stage} {o}" for o in
                          _off_device([*module.named_parameters(), *module.named_buffers()])]
            offenders += [f"rank {rank} DDP buffer {o}" for o in
                          _off_device((f"grad[{i}]", b.grad_data) for i, b in enumerate(chunk.buffers))]
    return {"offenders": offenders, "kinds": sorted(kinds)}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_stage_kind_is_built_on_the_runtime_device(layout):
    world, overrides = LAYOUTS[layout]
    result = run_in_fresh_process(_build_every_rank, world, overrides)
    assert result["offenders"] == [], "\n".join(result["offenders"])
    places = {k[0] for k in result["kinds"]}
    assert places >= {"first", "last"} and (layout != "pp4" or "middle" in places)
    assert layout != "tp2-pp2" or {k[1] for k in result["kinds"]} == {0, 1}
    assert layout != "pp2-vp2" or all(k[2] == 2 for k in result["kinds"])


def _step_eval_encode(run_dir: str, consolidated: str, sp_model: str) -> dict:
    """One training step and one held-out eval pass at TP2·PP2 on a first-stage and a last-stage rank, then
    one encode call, all under the recorder."""
    from types import SimpleNamespace

    from m2megatron import encode
    from m2megatron.config import load_config
    from m2megatron.train.trainer import Trainer

    world, overrides = LAYOUTS["tp2-pp2"]
    cfg = load_config(overrides=TINY + overrides + [f"--train.run_dir={run_dir}", "--train.tensorboard=false",
                                                    "--data.synthetic_eval_samples=6", "--eval.batch_size=4",
                                                    "--data.synthetic_train_samples=64", "--data.prefetch=0"])
    report = {"violations": [], "collectives": set(), "forward_inputs": 0}
    for rank in (0, 3):  # (tp 0, first stage), (tp 1, last stage)
        join_fake_world(rank, world)
        with recording() as recorder:
            trainer = Trainer(cfg, progress=False)
            recorder.watch_forward_inputs(trainer.modules)
            trainer.train_step()
            trainer.evaluate()
            trainer.close()
        report["violations"] += [f"rank {rank}: {v}" for v in recorder.violations]
        report["collectives"] |= set(recorder.collectives)
        report["forward_inputs"] += recorder.forward_inputs
    join_fake_world(0, 1)
    args = SimpleNamespace(checkpoint=consolidated, num_heads=None, preset=None, images=[], texts_file=None,
                           sp_model=sp_model, batch_size=4)
    with recording() as recorder:
        modules, groups, model_cfg = encode.build_model(args)
        recorder.watch_forward_inputs(modules)
        encode.encode_texts(modules, groups, ["a red circle", "一个蓝色的方块"], sp_model, model_cfg, batch_size=4)
        encode.encode_images(modules, groups, torch.rand(3, 3, model_cfg.image_size, model_cfg.image_size), 4)
    report["violations"] += [f"encode: {v}" for v in recorder.violations]
    report["forward_inputs"] += recorder.forward_inputs
    report["collectives"] = sorted(report["collectives"])
    return report


def test_a_training_step_an_eval_pass_and_encode_keep_every_tensor_on_the_runtime_device(tmp_path):
    from m2megatron.checkpoint.files import save_consolidated
    from m2megatron.config import load_config
    from m2megatron.data.sp_train import synthetic_tokenizer_path
    from m2megatron.models import M2Encoder, full_state_dict, init_weights
    from tests.reference_model import single_groups

    model_cfg = load_config(overrides=["--model.vocab_size=300"]).model
    model = M2Encoder(model_cfg, single_groups())
    init_weights(model, 0)
    save_consolidated(tmp_path / "tiny.safetensors", full_state_dict(model), model_cfg)
    sp_model = synthetic_tokenizer_path(tmp_path / "tok")
    report = run_in_fresh_process(_step_eval_encode, str(tmp_path / "run"), str(tmp_path / "tiny.safetensors"),
                                  str(sp_model))
    assert report["violations"] == [], "\n".join(report["violations"])
    assert report["forward_inputs"] > 100  # the recorder saw the stage forwards
    # The recorder saw the collectives of DDP, the loss gather, p2p and the eval gathers.
    assert {"c10d::allreduce_", "c10d::send", "c10d::recv_"} <= set(report["collectives"]), report["collectives"]
