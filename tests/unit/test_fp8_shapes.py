"""FP8 GEMMs need token counts divisible by 16: with 197 image tokens (ViT-B/16 at 224) the batch must be a
multiple of 16, checked in the config with one line naming the setting, and only when FP8 is on."""

import pytest

from m2megatron.config import ConfigError, load_config

pytestmark = pytest.mark.unit
FP8 = ["--model.preset=m2-0.4b", "--model.layer_spec=te", "--model.fp8=delayed"]


@pytest.mark.parametrize("overrides,needle", [
    (["--train.micro_batch_size=24"], "train.micro_batch_size: 24 gives 197·24 image tokens, not a multiple of 16"),
    (["--train.micro_batch_size=32", "--eval.batch_size=100"], "eval.batch_size: 100 gives 197·100 image tokens"),
])
def test_fp8_batch_not_giving_a_multiple_of_16_tokens_names_the_setting(overrides, needle):
    cfg = load_config(overrides=FP8 + overrides)
    with pytest.raises(ConfigError) as err:
        cfg.validate(world_size=1)
    assert needle in str(err.value) and "use a multiple of 16" in str(err.value)
    assert "\n" not in str(err.value)


def test_fp8_batches_of_16_pass_and_bf16_takes_any_batch():
    load_config(overrides=FP8 + ["--train.micro_batch_size=32", "--eval.batch_size=64"]).validate(world_size=1)
    load_config(overrides=["--model.preset=m2-0.4b", "--train.micro_batch_size=24",
                           "--eval.batch_size=100"]).validate(world_size=1)
