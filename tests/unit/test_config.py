"""The config system: presets, recipes, overrides, validation errors that name the setting."""

import dataclasses
import subprocess
import sys

import pytest

from m2megatron.config import (
    PRESETS,
    ConfigError,
    RunConfig,
    count_parameters,
    field_docs,
    load_config,
    parse_overrides,
    preset,
)

pytestmark = pytest.mark.unit


def _all_config_classes(cls=RunConfig):
    yield cls
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING:
            sub = f.default_factory()
            if dataclasses.is_dataclass(sub):
                yield from _all_config_classes(type(sub))


def test_every_config_field_has_a_docstring():
    for cls in _all_config_classes():
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


def test_m2_10b_inference_parameter_count_matches_spec():
    # SPEC.md §1.6 "params read at inference"; the model we build holds exactly these.
    assert count_parameters(preset("m2-10b"))["total"] == 9_552_551_937
    assert count_parameters(preset("m2-1b"))["total"] == 689_444_865
    assert count_parameters(preset("m2-0.4b"))["total"] == 240_228_865


def test_released_presets_have_spec_sizes():
    small = PRESETS["m2-0.4b"]
    assert (small.hidden_size, small.num_layers, small.embed_dim) == (768, 9, 768)
    assert PRESETS["m2-10b"].num_attention_heads == 32 and PRESETS["m2-10b"].head_dim == 128
    assert PRESETS["m2-1b"].vision_position_table == 199


def test_overrides_parse_nested_typed_values():
    assert parse_overrides(["--parallel.tensor_parallel=2", "--train.precision", "bf16", "--data.shards=a,b"]) == {
        "parallel": {"tensor_parallel": 2}, "train": {"precision": "bf16"}, "data": {"shards": "a,b"}}
    cfg = load_config(overrides=["--parallel.tensor_parallel=2", "--data.shards=a.tar,b.tar",
                                 "--train.tensorboard=no"])
    assert cfg.parallel.tensor_parallel == 2 and cfg.data.shards == ["a.tar", "b.tar"]
    assert cfg.train.tensorboard is False


def test_recipe_then_overrides_then_preset_order(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  preset: m2-0.4b\n  num_layers: 2\ntrain:\n  micro_batch_size: 8\n")
    cfg = load_config(recipe, ["--train.micro_batch_size=4"])
    assert cfg.model.hidden_size == 768 and cfg.model.num_layers == 2 and cfg.train.micro_batch_size == 4


def test_resolved_config_is_written_and_reloads(tmp_path):
    cfg = load_config(overrides=["--parallel.pipeline_parallel=2"])
    path = cfg.save(tmp_path)
    again = load_config(path)
    assert again == cfg


@pytest.mark.parametrize("overrides,world,needle", [
    (["--parallel.tensor_parallel=3"], 6, "parallel.tensor_parallel: 3 does not divide model.num_attention_heads"),
    (["--parallel.tensor_parallel=2"], 6, None),
    (["--parallel.pipeline_parallel=2"], 3, "world size 3 is not divisible"),
    (["--parallel.loss_group_size=3"], 4, "parallel.loss_group_size: 3 does not divide the data-parallel size 4"),
    (["--parallel.pipeline_parallel=4"], 4, "do not divide model.num_layers=2"),
    (["--parallel.virtual_pipeline=2"], 4, "parallel.virtual_pipeline: needs parallel.pipeline_parallel >= 2"),
    (["--model.fp8=delayed"], 1, "model.fp8: 'delayed' needs model.layer_spec='te'"),
    (["--model.num_attention_heads=5"], 1, "model.num_attention_heads: 5 does not divide model.hidden_size=64"),
    (["--train.global_batch_size=30"], 4, "train.global_batch_size: 30 is not a multiple"),
    (["--optim.min_lr=1"], 1, "optim.min_lr"),
    (["--parallel.pipeline_parallel=2", "--parallel.virtual_pipeline=2", "--model.num_layers=4"], 2,
     "train.global_batch_size: the interleaved pipeline (parallel.virtual_pipeline=2) runs microbatches in groups"),
    (["--parallel.pipeline_parallel=2", "--parallel.virtual_pipeline=2", "--model.num_layers=4",
      "--train.global_batch_size=128"], 2, None),
])
def test_impossible_settings_name_themselves(overrides, world, needle):
    cfg = load_config(overrides=overrides)
    if needle is None:
        cfg.validate(world_size=world)
        return
    with pytest.raises(ConfigError, match=None) as err:
        cfg.validate(world_size=world)
    assert needle in str(err.value)


@pytest.mark.parametrize("overrides,needle", [
    (["--parallel.tensor_paralel=2"], "parallel.tensor_paralel: unknown setting"),
    (["--parallel.tensor_parallel=two"], "parallel.tensor_parallel: expected an integer"),
    (["--model.layer_spec=fast"], "model.layer_spec: 'fast' is not one of"),
    (["--model.preset=m2-3b"], "model.preset: unknown preset 'm2-3b'"),
    (["parallel.tensor_parallel=2"], "expected an override of the form"),
])
def test_bad_values_name_themselves(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=overrides)
    assert needle in str(err.value)


def test_config_command_prints_10b_count_and_one_line_errors():
    ok = subprocess.run([sys.executable, "-m", "m2megatron.config", "--preset", "m2-10b"],
                        capture_output=True, text=True, check=True)
    assert "total=9,552,551,937" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "m2megatron.config", "--parallel.tensor_parallel=3",
                          "--world-size", "6"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "error: parallel.tensor_parallel: 3 does not divide model.num_attention_heads=4"]
