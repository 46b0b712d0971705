"""Checkpoints we must not load are refused with an error naming the reason, before anything is read or run."""

import json
import multiprocessing as mp
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from m2megatron.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from m2megatron.checkpoint.atomic import resolve
from m2megatron.checkpoint.safety import describe_files
from m2megatron.config import load_config
from m2megatron.parallel import Layout, build_groups
from tests.checkpoint_toy import build_toy

pytestmark = pytest.mark.distributed


class NotAllowed:
    """Stored in a rank_state, it can only be read back by unpickling code: must be refused."""


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _groups(tp=2):
    mp.current_process()._config["daemon"] = False  # Megatron's writer forks; pool workers are daemons
    return build_groups(Layout(world_size=dist.get_world_size(), tensor_parallel=tp))


def _save(root, hidden, rank_state=None):
    groups = _groups()
    chunks, opt, sched = build_toy(groups, hidden=hidden)
    save_checkpoint(root, 1, chunks, opt, sched, groups=groups, config=load_config(preset_name="tiny"),
                    rank_state=rank_state)


def _try_load(root, hidden=32, overrides=None, with_optimizer=True):
    groups = _groups()
    chunks, opt, sched = build_toy(groups, hidden=hidden)
    config = load_config(preset_name="tiny", overrides=overrides or {})
    try:
        load_checkpoint(root, chunks, opt if with_optimizer else None, sched if with_optimizer else None,
                        groups=groups, config=config)
    except CheckpointError as exc:
        return str(exc)
    return "loaded"


@pytest.fixture(scope="module")
def saved(dist_pool, tmp_path_factory):
    root = tmp_path_factory.mktemp("refusals") / "good"
    dist_pool(2).run(_save, str(root), 32)
    return resolve(root)


def _copy(saved: Path, tmp_path: Path) -> Path:
    target = tmp_path / saved.name
    shutil.copytree(saved, target)
    return target


def _rewrite_manifest(ckpt: Path, name: str) -> None:
    """What an attacker would do too: make the manifest agree with a modified file."""
    meta = json.loads((ckpt / "m2meta.json").read_text())
    meta["files"].update(describe_files(ckpt, [name]))
    (ckpt / "m2meta.json").write_text(json.dumps(meta))


def test_the_untouched_checkpoint_loads(dist_pool, saved):
    assert dist_pool(2).run(_try_load, str(saved)) == ["loaded", "loaded"]


def test_other_preset_is_refused_naming_each_differing_field(dist_pool, saved):
    message = dist_pool(2).run(_try_load, str(saved), 32, {"model": {"hidden_size": 128, "num_layers": 3}})[0]
    assert "another model architecture" in message
    assert "model.hidden_size: checkpoint 64, current 128" in message and "model.num_layers" in message
    assert "model.vocab_size" not in message


def test_other_architecture_is_refused_naming_tensors(dist_pool, saved):
    message = dist_pool(2).run(_try_load, str(saved), 48)[0]
    assert "do not match the current model" in message and "shape of in_row.weight" in message


def test_missing_shard_file_is_refused(dist_pool, saved, tmp_path):
    ckpt = _copy(saved, tmp_path)
    (ckpt / "__1_0.distcp").unlink()
    message = dist_pool(2).run(_try_load, str(ckpt))[0]
    assert "__1_0.distcp: missing shard file" in message


def test_corrupted_shard_file_is_refused(dist_pool, saved, tmp_path):
    ckpt = _copy(saved, tmp_path)
    data = bytearray((ckpt / "__0_0.distcp").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (ckpt / "__0_0.distcp").write_bytes(bytes(data))
    message = dist_pool(2).run(_try_load, str(ckpt))[0]
    assert "__0_0.distcp: corrupted" in message


def test_truncated_metadata_is_refused(dist_pool, saved, tmp_path):
    ckpt = _copy(saved, tmp_path)
    (ckpt / ".metadata").write_bytes((ckpt / ".metadata").read_bytes()[:100])
    message = dist_pool(2).run(_try_load, str(ckpt))[0]
    assert ".metadata: size 100 bytes" in message


@pytest.mark.parametrize("victim", ["common.pt", ".metadata"])
def test_pickle_that_runs_code_is_refused_and_not_run(dist_pool, saved, tmp_path, victim):
    ckpt = _copy(saved, tmp_path)
    marker = tmp_path / "exploit_ran"
    if victim == "common.pt":
        torch.save({"m2": Exploit(marker)}, ckpt / victim)
    else:
        import pickle

        (ckpt / victim).write_bytes(pickle.dumps(Exploit(marker)))
    _rewrite_manifest(ckpt, victim)
    message = dist_pool(2).run(_try_load, str(ckpt))[0]
    assert "refusing to load" in message and victim in message
    assert not marker.exists(), "the checkpoint's pickle was executed"


def test_rank_state_that_needs_pickled_code_is_refused(dist_pool, tmp_path):
    pool = dist_pool(2)
    pool.run(_save, str(tmp_path), 32, {"sampler": NotAllowed()})
    message = pool.run(_try_load, str(tmp_path))[0]
    assert "m2.rank_state.user" in message and "weights_only" in message
