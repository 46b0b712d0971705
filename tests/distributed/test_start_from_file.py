"""checkpoint.load=<weights file>. A run at TP2·PP2·VP2 (sequence parallel, distributed optimizer) starts from a
reference-format .ckpt whose sizes it takes from the file, trains 2 steps at a learning rate of ~0, and its
checkpoint, consolidated and exported back to the reference format, equals the original tensor for tensor. A
consolidated .safetensors loads exactly at TP2, each rank reading its own slices."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.test_trainer import SMALL, _fit

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

VOCAB, TEXT_POSITIONS = 300, 16  # not in SMALL: these two come from the file (300 rows padded to 1024 on load)
LAYERS = ["--model.num_layers=4"]  # PP2 × VP2: one tower layer per stage chunk


def _reference_file(path) -> dict[str, torch.Tensor]:
    """A random model in the released layout, written as the reference's Lightning-style .ckpt. Made from our
    layout, so its unused keys hold the exporter's defaults and VL branch B copies branch A, as an export
    writes them."""
    from m2megatron.checkpoint.reference_format import ours_to_reference, reference_shapes, reference_to_ours
    from m2megatron.config import load_config

    sizes = load_config(overrides=SMALL + LAYERS + [f"--model.vocab_size={VOCAB}",
                                           f"--model.text_position_table={TEXT_POSITIONS}"]).model
    gen = torch.Generator().manual_seed(7)
    random = {k: torch.randn(s, generator=gen) * 0.05 for k, s in reference_shapes(sizes).items()}
    random["logit_scale"] = torch.tensor(2.5)
    full, _ = reference_to_ours(random, sizes)
    ref = ours_to_reference(full, sizes)
    torch.save({"state_dict": ref}, path)
    return ref


def test_training_starts_from_a_released_checkpoint_at_tp2_pp2_vp2(dist_pool, tmp_path):
    from m2megatron.checkpoint.consolidate import consolidate
    from m2megatron.checkpoint.files import export_reference, load_consolidated_config

    original = _reference_file(tmp_path / "m2_encoder_small.ckpt")
    run = tmp_path / "run"
    dist_pool(4).run(_fit, str(run), LAYERS + [
        f"--checkpoint.load={tmp_path / 'm2_encoder_small.ckpt'}", "--checkpoint.load_mode=finetune",
        "--parallel.tensor_parallel=2", "--parallel.pipeline_parallel=2", "--parallel.virtual_pipeline=2",
        "--train.global_batch_size=16", "--parallel.sequence_parallel=true", "--parallel.distributed_optimizer=true",
        "--optim.lr=1e-12", "--optim.min_lr=0", "--optim.warmup_steps=1", "--train.train_steps=2",
        "--train.eval_at_end=false", "--train.tensorboard=false"])

    consolidate(run / "checkpoints", tmp_path / "consolidated")
    cfg = load_consolidated_config(tmp_path / "consolidated" / "model.safetensors")
    assert (cfg.vocab_size, cfg.text_position_table, cfg.num_attention_heads) == (VOCAB, TEXT_POSITIONS, 4)
    export_reference(tmp_path / "consolidated" / "model.safetensors", tmp_path / "back.ckpt")
    back = torch.load(tmp_path / "back.ckpt", weights_only=True)
    assert list(back) == list(original)
    for key, tensor in original.items():  # 2 steps at lr 1e-12 move no weight by more than fp32 rounding
        torch.testing.assert_close(back[key], tensor, rtol=2.0 ** -23, atol=1e-11, msg=key)


def _started_weights(run_dir: str, overrides: list[str]) -> list[str]:
    """The trainer's full weights right after it started from a file: the names that differ from the file's."""
    from safetensors.torch import load_file

    from m2megatron.config import load_config
    from m2megatron.models.state import full_state_dict
    from m2megatron.train.trainer import Trainer

    cfg = load_config(overrides=SMALL + [f"--train.run_dir={run_dir}", "--train.tensorboard=false"] + overrides)
    trainer = Trainer(cfg, progress=False)
    try:
        loaded = {k: v for m in trainer.modules for k, v in full_state_dict(m).items()}
        expected = load_file(cfg.checkpoint.load)
        return sorted(k for k in expected if k not in loaded or not torch.equal(loaded[k], expected[k]))
    finally:
        trainer.close()


def test_a_consolidated_file_loads_at_tp2_each_rank_reading_its_slices(dist_pool, tmp_path):
    from m2megatron.checkpoint.files import save_consolidated
    from m2megatron.checkpoint.reference_format import reference_shapes, reference_to_ours
    from m2megatron.config import load_config

    sizes = load_config(overrides=SMALL + [f"--model.vocab_size={VOCAB}"]).model
    gen = torch.Generator().manual_seed(8)
    full, _ = reference_to_ours({k: torch.randn(s, generator=gen) for k, s in reference_shapes(sizes).items()}, sizes)
    save_consolidated(tmp_path / "model.safetensors", full, sizes)
    differing = dist_pool(2).run(_started_weights, str(tmp_path / "run"), [
        f"--checkpoint.load={tmp_path / 'model.safetensors'}", "--checkpoint.load_mode=weights",
        "--parallel.tensor_parallel=2"])
    assert differing == [[], []]
