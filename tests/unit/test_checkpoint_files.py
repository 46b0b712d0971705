"""Checkpoint directory handling, manifest comparisons and the safe loaders, without processes or models."""

import io
import json
import os
import pickle
import struct

import pytest
import torch

from m2megatron.checkpoint import atomic, manifest, safety
from m2megatron.checkpoint.consolidate import _safetensors_header

pytestmark = pytest.mark.unit


def _fake_checkpoint(root, step):
    path = root / atomic.iter_name(step)
    path.mkdir(parents=True)
    (path / atomic.META_NAME).write_text("{}")
    return path


def test_latest_names_the_published_checkpoint_and_prune_keeps_the_newest(tmp_path):
    for step in (1, 2, 3):
        temp = atomic.new_temp_dir(tmp_path, step)
        temp.mkdir()
        (temp / atomic.META_NAME).write_text("{}")
        atomic.publish(temp, tmp_path, step)
    assert (tmp_path / "latest").read_text() == "iter_0000003\n"
    assert atomic.resolve(tmp_path) == tmp_path / "iter_0000003"
    assert atomic.resolve(tmp_path / "latest") == tmp_path / "iter_0000003"
    removed = atomic.prune(tmp_path, keep_last=2)
    assert [p.name for p in removed] == ["iter_0000001"]
    assert [p.name for p in atomic.complete_checkpoints(tmp_path)] == ["iter_0000002", "iter_0000003"]


def test_incomplete_directories_are_never_resolved(tmp_path):
    _fake_checkpoint(tmp_path, 5)
    (tmp_path / "iter_0000009").mkdir()  # renamed but without m2meta.json: not complete
    atomic.new_temp_dir(tmp_path, 10).mkdir()
    (tmp_path / "latest").write_text("iter_0000009\n")  # a damaged pointer falls back to the newest complete
    assert atomic.resolve(tmp_path) == tmp_path / "iter_0000005"
    temp = next(tmp_path.glob(".tmp.*"))
    with pytest.raises(safety.CheckpointError, match="incomplete checkpoint"):
        atomic.resolve(temp)
    atomic.remove_stale_temps(tmp_path)
    assert not list(tmp_path.glob(".tmp.*"))


def test_empty_root_is_a_clear_error(tmp_path):
    with pytest.raises(safety.CheckpointError, match="no complete checkpoint"):
        atomic.resolve(tmp_path)


def test_model_config_differences_name_each_architecture_field():
    old = {"model": {"hidden_size": 64, "num_layers": 2, "drop_path_rate": 0.0, "preset": "tiny"}}
    new = {"model": {"hidden_size": 768, "num_layers": 2, "drop_path_rate": 0.1, "preset": "m2-0.4b"}}
    assert manifest.model_config_differences(old, new) == [
        "model.hidden_size: checkpoint 64, current 768", "model.preset: checkpoint 'tiny', current 'm2-0.4b'"]


def test_tensor_differences_list_missing_unexpected_and_reshaped():
    saved = {"a": {"shape": [2, 3]}, "b": {"shape": [4]}}
    current = {"a": {"shape": [2, 4]}, "c": {"shape": [1]}}
    assert manifest.tensor_differences(saved, current) == [
        "missing in checkpoint: c [1]", "not in the current model: b [4]",
        "shape of a: checkpoint [2, 3], current [2, 4]"]


def test_manifest_read_refuses_foreign_or_broken_json(tmp_path):
    (tmp_path / atomic.META_NAME).write_text("{not json")
    with pytest.raises(safety.CheckpointError, match="corrupted"):
        manifest.read(tmp_path)
    (tmp_path / atomic.META_NAME).write_text(json.dumps({"format": "other"}))
    with pytest.raises(safety.CheckpointError, match="unknown checkpoint format"):
        manifest.read(tmp_path)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


def test_weights_only_load_refuses_pickled_code():
    buf = io.BytesIO()
    torch.save({"x": _RunsCode()}, buf)
    buf.seek(0)
    with pytest.raises(safety.CheckpointError, match="refusing to load"):
        safety.safe_torch_load(buf, "crafted.pt")


def test_metadata_unpickler_refuses_foreign_globals(tmp_path):
    (tmp_path / ".metadata").write_bytes(pickle.dumps(_RunsCode()))
    with pytest.raises(safety.CheckpointError, match="posix.system|os.system"):
        safety.read_dcp_metadata(tmp_path)


def test_file_checks_report_missing_truncated_and_changed(tmp_path):
    for name in ("a", "b", "c"):
        (tmp_path / name).write_bytes(b"0123456789")
    files = safety.describe_files(tmp_path, ["a", "b", "c"])
    (tmp_path / "a").unlink()
    (tmp_path / "b").write_bytes(b"01234")
    (tmp_path / "c").write_bytes(b"0123456780")
    problems = safety.check_files(tmp_path, files, ["a", "b", "c"], verify_crc=True)
    assert [p.split(": ", 1)[1].split(" ")[0] for p in problems] == ["missing", "size", "corrupted"]


def test_safetensors_header_is_aligned_and_readable():
    header = _safetensors_header({"w": {"shape": [2, 3], "dtype": "float32"}, "b": {"shape": [3], "dtype": "bfloat16"}},
                                 {"step": "7"})
    assert len(header) % 8 == 0
    parsed = json.loads(header)
    assert parsed["w"]["data_offsets"] == [0, 24] and parsed["b"]["data_offsets"] == [24, 30]
    assert struct.pack("<Q", len(header))  # the 8-byte length prefix the writer puts first
