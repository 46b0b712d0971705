"""CLIP_benchmark adapter: our checkpoints in `clip_benchmark eval` (docs/EVAL.md, "CLIP_benchmark").

    python -m m2megatron.eval.clip_benchmark_adapter eval --model_type m2megatron --model runs/tiny/config.yaml \\
        --pretrained runs/tiny/checkpoints --dataset wds/... --dataset_root DIR --no_amp

`load_m2megatron(model_name, pretrained, cache_dir, device)` has the signature of CLIP_benchmark's model
loaders (`clip_benchmark.models.TYPE2FUNC`, called by `load_clip` with these keywords) and returns
(model, transform, tokenizer):

- model_name: a preset (tiny, m2-0.4b, m2-1b, m2-10b) or a YAML config (a run's config.yaml), optionally
  followed in the same string by --section.field=value overrides, e.g. "m2-0.4b --data.tokenizer=sp.model";
- pretrained: our checkpoint directory or root (saved at any layout, loaded here on one process at
  TP=PP=1), a consolidated .safetensors file, a released reference .ckpt, or "none" (seeded weights);
- model.encode_image(images [b, 3, S, S]) and model.encode_text(tokens) give L2-normalized [b, E]
  embeddings; CLIP_benchmark's own F.normalize on them changes nothing beyond float rounding;
- transform(PIL image) → float [3, S, S]: the reference bicubic squash, as our launchers' PIL decoder;
- tokenizer(texts) → LongTensor [n, 2, L], token ids and attention mask stacked (the mask cannot be
  recovered from the ids when a text holds a literal <|endoftext|>), after the reference text
  preprocessing unless eval.reference_text_preprocessing=false.

`register()` adds the loader to clip_benchmark.models as model type "m2megatron"; the module's entry
point registers it, fixes clip-benchmark 1.6.2's zero-shot accuracy for NumPy 2 (issue #147 there) and
hands the command line to clip_benchmark's own CLI.
"""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("m2megatron.eval")
MODEL_TYPE = "m2megatron"
_GROUPS: dict[str, object] = {}  # one world-of-one process group per process, reused by every load


class ReferenceTransform:
    """PIL image → float32 [3, S, S] in [−1, 1]: the reference eval squash (picklable for DataLoader workers)."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def __call__(self, image) -> torch.Tensor:
        from m2megatron.data.image import eval_preprocess

        return torch.from_numpy(np.ascontiguousarray(eval_preprocess(image, self.image_size)))


class PackedTokenizer:
    """texts → LongTensor [n, 2, L] (ids, mask), through our tokenizer and the reference preprocessing."""

    def __init__(self, tokenizer, reference_preprocessing: bool = True):
        self.tokenizer, self.reference_preprocessing = tokenizer, reference_preprocessing

    def __call__(self, texts) -> torch.Tensor:
        from m2megatron.eval.batches import prepare_texts

        texts = [texts] if isinstance(texts, str) else list(texts)
        ids, mask = self.tokenizer.encode(prepare_texts(texts, self.reference_preprocessing))
        return torch.stack([ids, mask], dim=1)  # [n, 2, L]


class ClipBenchmarkModel(torch.nn.Module):
    """encode_image / encode_text as CLIP_benchmark calls them, over our whole model (one stage, PP=1)."""

    def __init__(self, stage: torch.nn.Module, eos_id: int):
        super().__init__()
        self.stage, self.eos_id = stage, eos_id

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.stage.encode_image(images.float())

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [n, 2, L] from PackedTokenizer, or plain ids [n, L] (mask: up to the first <|endoftext|>)."""
        if tokens.dim() == 3:
            ids, mask = tokens[:, 0], tokens[:, 1]
        else:
            first_eos = (tokens == self.eos_id).long().argmax(dim=1, keepdim=True)  # [n, 1]; [CLS] is never eos
            mask = (torch.arange(tokens.shape[1], device=tokens.device)[None] <= first_eos).long()
            ids = tokens
        return self.stage.encode_text(ids, mask)


def _config(model_name: str):
    from m2megatron.config import load_config

    head, *overrides = shlex.split(model_name)
    if head.endswith((".yaml", ".yml")) or Path(head).is_file():
        return load_config(head, overrides)
    return load_config(None, overrides, preset_name=head)


def _groups(device: torch.device):
    """A process group of this process alone (CLIP_benchmark evaluates one model per process)."""
    import torch.distributed as dist

    from m2megatron.config import ParallelConfig
    from m2megatron.parallel import initialize, read_launch_env

    if not dist.is_initialized():
        _GROUPS.clear()  # someone shut the process group down (e.g. a launcher run in the same process)
    if str(device) not in _GROUPS:
        if dist.is_initialized() and dist.get_world_size() != 1:
            raise ValueError("CLIP_benchmark adapter: torch.distributed already runs a world of "
                             f"{dist.get_world_size()}; the adapter evaluates one model per process")
        _GROUPS[str(device)] = initialize(ParallelConfig(), read_launch_env({}), device=device)
    return _GROUPS[str(device)]


def load_m2megatron(model_name: str = "tiny", pretrained: str = "none", cache_dir: str | None = None,
                    device: str | torch.device = "cpu"):
    """(model, transform, tokenizer) of our checkpoint `pretrained` built from `model_name` (module docstring)."""
    from m2megatron.eval.launcher import build_eval_model, fit_layout, resolve_tokenizer
    from m2megatron.parallel import seed_everything

    cfg = fit_layout(_config(model_name), 1, set())  # one process: TP=PP=1, any saved layout loads
    cfg.validate(world_size=1)
    groups = _groups(torch.device(device))
    seed_everything(cfg.train.seed, groups)
    fmt = "none" if pretrained in (None, "", "none") else "auto"
    cfg, (stage,) = build_eval_model(cfg, groups, None if fmt == "none" else pretrained, fmt)
    tokenizer = resolve_tokenizer(cfg, None)
    model = ClipBenchmarkModel(stage, tokenizer.eos_id).to(device).eval()
    if cache_dir:
        log.info("CLIP_benchmark adapter: cache_dir %s is not used (weights load from %s)", cache_dir, pretrained)
    return model, ReferenceTransform(cfg.model.image_size), PackedTokenizer(tokenizer,
                                                                              cfg.eval.reference_text_preprocessing)


def register() -> None:
    """Make model type "m2megatron" known to clip_benchmark (its models package imports open_clip)."""
    from clip_benchmark import models

    models.TYPE2FUNC[MODEL_TYPE] = load_m2megatron
    if MODEL_TYPE not in models.MODEL_TYPES:
        models.MODEL_TYPES.append(MODEL_TYPE)  # the CLI's --model_type choices are this list


def _topk_accuracy(output: torch.Tensor, target: torch.Tensor, topk=(1,)) -> list[float]:
    """clip-benchmark's zero-shot `accuracy` (top-k by torch.topk, fraction of hits), with a scalar conversion
    that NumPy 2 accepts."""
    pred = output.topk(max(topk), 1, True, True)[1].t()  # [k, N]
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [float(correct[:k].reshape(-1).float().sum().item()) / len(target) for k in topk]


def fix_zeroshot_accuracy_for_numpy2() -> bool:
    """clip-benchmark 1.6.2's `zeroshot_classification.accuracy` calls float() on a shape-(1,) array, a
    TypeError on the NumPy 2 we pin (LAION-AI/CLIP_benchmark issue #147, open): every zero-shot run fails at
    its last step. Replace it with the same computation when this NumPy needs it; returns whether it did."""
    try:
        float(np.zeros(1))
        return False
    except TypeError:
        from clip_benchmark.metrics import zeroshot_classification

        zeroshot_classification.accuracy = _topk_accuracy
        return True


def main() -> int | None:
    try:
        register()
        fix_zeroshot_accuracy_for_numpy2()
        from clip_benchmark.cli import main as clip_benchmark_main
    except ImportError as exc:
        raise ValueError(f"CLIP_benchmark's CLI cannot be imported ({exc}); it needs clip-benchmark installed with "
                         "its dependencies (torchvision matching your torch, open_clip_torch, ...)") from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return clip_benchmark_main()


if __name__ == "__main__":
    from m2megatron.eval.run_command import run

    run(main)
