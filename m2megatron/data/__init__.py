"""Data: formats, DALI and PIL decoding, the GLM-compatible tokenizer, synthetic bilingual data, the loader.

The names the trainer and eval use are re-exported here (see docs/DATA.md); eval sets live in m2megatron.eval.
"""

from m2megatron.data.build import build_source, build_train_loader, image_limits, resolve_tokenizer
from m2megatron.data.formats import ShardError
from m2megatron.data.loader import TrainLoader
from m2megatron.data.skips import REASONS as SKIP_REASONS
from m2megatron.data.sp_train import synthetic_tokenizer_path, train_sentencepiece
from m2megatron.data.synthetic import NUM_SCENES, SyntheticScenes
from m2megatron.data.tokenizer import Tokenizer, preprocess_eval_text

__all__ = [
    "NUM_SCENES", "SKIP_REASONS", "ShardError", "SyntheticScenes", "Tokenizer", "TrainLoader", "build_source",
    "build_train_loader", "image_limits", "preprocess_eval_text", "resolve_tokenizer", "synthetic_tokenizer_path",
    "train_sentencepiece",
]
