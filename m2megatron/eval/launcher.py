"""What the eval entry points share: arguments, a layout that fits the launch, process groups, the model
(`build_eval_model`), the tokenizer, and writing results on rank 0.

    with session(parser) as s:          # s.cfg, s.groups, s.model_chunks, s.tokenizer, s.bad, s.args
        report = ...
        s.write("retrieval", name, report)

Library code: bad settings and files raise ValueError (ConfigError for settings); the entry points turn
them into one line on stderr (m2megatron/eval/run_command.py).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from m2megatron.config import RunConfig, load_config
from m2megatron.config.base import ConfigError
from m2megatron.eval.inputs import BadInputs

log = logging.getLogger("m2megatron.eval")
CHECKPOINT_FORMATS = ("auto", "ours", "consolidated", "reference", "none")
LAYOUT_KEYS = ("tensor_parallel", "pipeline_parallel", "virtual_pipeline")


def common_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Any other --section.field=value overrides a config setting "
                                            "(python -m m2megatron.config --describe lists them).")
    parser.add_argument("--checkpoint", help="our checkpoint directory or root (any layout), a consolidated "
                                             ".safetensors file, or a released reference .ckpt")
    parser.add_argument("--checkpoint-format", choices=CHECKPOINT_FORMATS, default="auto",
                        help="how to read --checkpoint (auto: by its shape); 'none' evaluates seeded random "
                             "weights (smoke tests only)")
    parser.add_argument("--config", help="YAML recipe, e.g. <run_dir>/config.yaml of the trained run")
    parser.add_argument("--preset", help="model preset (tiny, m2-0.4b, m2-1b, m2-10b)")
    parser.add_argument("--tokenizer", help="SentencePiece model (default: data.tokenizer, or the cached synthetic "
                                            "tokenizer for synthetic data)")
    parser.add_argument("--out", help="output directory for results.json / results.md (default: eval.output_dir "
                                      "or <train.run_dir>/eval)")
    parser.add_argument("--name", help="dataset name in the results (default: from the input file)")
    return parser


# ---- the model ------------------------------------------------------------------------------------------

def _build_stages(cfg: RunConfig, groups) -> list:
    """This rank's stage modules (one per virtual stage) through the stage runtime, on the runtime device,
    weights not yet loaded."""
    from m2megatron.runtime import build_stages

    return build_stages(cfg, groups, training=False, init=False).modules


def _detect_format(path: Path) -> str:
    if path.is_dir():
        return "ours"
    from m2megatron.checkpoint.files import is_consolidated

    return "consolidated" if is_consolidated(path) else "reference"


def resolve_weights(cfg: RunConfig, checkpoint: str | None, fmt: str) -> tuple[RunConfig, str, dict | None]:
    """(config to build with, format, full state dict of a single-file checkpoint or None).

    A consolidated file or a released reference checkpoint carries its own sizes; they replace the
    config's model sizes (the layer implementation settings are kept).
    """
    if fmt == "none":
        log.warning("evaluating seeded random weights (--checkpoint-format none): numbers are meaningless")
        return cfg, "none", None
    if checkpoint is None:
        raise ValueError("eval: --checkpoint is required (or --checkpoint-format none for seeded random weights)")
    path = Path(checkpoint)
    if not path.exists():
        raise ValueError(f"eval: checkpoint {path} does not exist")
    fmt = _detect_format(path) if fmt == "auto" else fmt
    if fmt == "ours":
        if not path.is_dir():
            raise ValueError(f"eval: {path} is not a checkpoint directory (--checkpoint-format ours)")
        return cfg, fmt, None
    from m2megatron.checkpoint.files import load_any

    heads = cfg.model.num_attention_heads if cfg.model.preset != "tiny" else None
    file_cfg, full, _ = load_any(path, num_heads=heads)
    model = dataclasses.replace(file_cfg, layer_spec=cfg.model.layer_spec, fp8=cfg.model.fp8)
    return dataclasses.replace(cfg, model=model), fmt, full


def _load_weights(modules: list, cfg: RunConfig, groups, checkpoint: str | None, fmt: str,
                  full: dict | None) -> None:
    """Fill this rank's stages: seeded init (none), a full state dict (single files), or our checkpoint."""
    from m2megatron.models import init_weights, load_full_state_dict

    if fmt == "none":
        for module in modules:
            init_weights(module, cfg.train.seed)
    elif full is not None:
        for module in modules:
            load_full_state_dict(module, full)
    else:
        from m2megatron.checkpoint import load_checkpoint

        load_checkpoint(checkpoint, modules, groups=groups, config=cfg, restore_rng=False)


def build_eval_model(cfg: RunConfig, groups, checkpoint: str | None, checkpoint_format: str = "auto"
                     ) -> tuple[RunConfig, list[torch.nn.Module]]:
    """(config the model was built with, this rank's model chunks) with the weights of `checkpoint`.

    The one way eval builds a model (launchers and the CLIP_benchmark adapter). checkpoint_format is one
    of CHECKPOINT_FORMATS; a single-file checkpoint's own sizes replace the config's model sizes.
    Collective over the job's ranks for our checkpoint directories.
    """
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"eval: checkpoint format {checkpoint_format!r} is not one of {list(CHECKPOINT_FORMATS)}")
    cfg, fmt, full = resolve_weights(cfg, checkpoint, checkpoint_format)
    modules = _build_stages(cfg, groups)
    _load_weights(modules, cfg, groups, checkpoint, fmt, full)
    return cfg, modules


def checkpoint_info(checkpoint: str | None, fmt: str) -> dict:
    """{"checkpoint_format", "checkpoint_path", "step"} of what is evaluated (step: our checkpoints only)."""
    if fmt == "none" or checkpoint is None:
        return {"checkpoint_format": "none", "checkpoint_path": None, "step": None}
    path = Path(checkpoint)
    fmt = _detect_format(path) if fmt == "auto" else fmt
    if fmt != "ours":
        return {"checkpoint_format": fmt, "checkpoint_path": str(path.resolve()), "step": None}
    from m2megatron.checkpoint import atomic, manifest

    resolved = atomic.resolve(path)
    return {"checkpoint_format": fmt, "checkpoint_path": str(resolved.resolve()),
            "step": int(manifest.read(resolved)["step"])}


# ---- the layout ---------------------------------------------------------------------------------------

def explicit_layout_keys(overrides: list[str]) -> set[str]:
    """The parallel.{tensor_parallel, pipeline_parallel, virtual_pipeline} given on the command line."""
    from m2megatron.config.run import parse_overrides

    return set(parse_overrides(overrides).get("parallel", {})) & set(LAYOUT_KEYS)


def fit_layout(cfg: RunConfig, world_size: int, explicit: set[str]) -> RunConfig:
    """The config's layout when it fits `world_size` ranks, else data-parallel only (logged).

    Eval has no loss, so loss groups are dropped; virtual pipeline stages too unless given explicitly
    (any layout loads our checkpoints). A layout given on the command line is kept: a misfit is an error.
    """
    keep_vp = "virtual_pipeline" in explicit
    par = dataclasses.replace(cfg.parallel, loss_group_size=None,
                              virtual_pipeline=cfg.parallel.virtual_pipeline if keep_vp else None)
    tp, pp = par.tensor_parallel, par.pipeline_parallel
    if world_size % (tp * pp) and explicit:
        raise ConfigError(f"parallel.tensor_parallel: world size {world_size} is not divisible by "
                          f"tensor_parallel×pipeline_parallel = {tp}×{pp} (given on the command line); launch a "
                          f"multiple of {tp * pp} ranks (torchrun --nproc-per-node {tp * pp} …) or leave out "
                          "--parallel.* to evaluate data-parallel only")
    if world_size % (tp * pp):
        log.info("eval: the config's layout TP=%d × PP=%d does not fit %d rank(s); evaluating data-parallel only "
                 "(TP=1, PP=1, DP=%d). The checkpoint loads at any layout; --parallel.tensor_parallel=… "
                 "--parallel.pipeline_parallel=… choose another.", tp, pp, world_size, world_size)
        par = dataclasses.replace(par, tensor_parallel=1, pipeline_parallel=1, virtual_pipeline=None)
    return dataclasses.replace(cfg, parallel=par)


def resolve_tokenizer(cfg: RunConfig, explicit: str | None):
    from m2megatron.data.tokenizer import Tokenizer

    path = explicit or cfg.data.tokenizer
    if path is None:
        if cfg.data.source != "synthetic":
            raise ValueError("eval: no tokenizer; pass --tokenizer sp.model or set data.tokenizer")
        from m2megatron.data.sp_train import synthetic_tokenizer_path

        path = synthetic_tokenizer_path(Path(cfg.train.run_dir))
    return Tokenizer(path, cfg.model.max_text_len)


def synthetic_eval_set(cfg: RunConfig) -> tuple[list, list[list[str]]]:
    """The held-out synthetic set of the config: uint8 images and one caption each."""
    from m2megatron.eval.inputs import synthetic_held_out

    return synthetic_held_out(seed=cfg.train.seed, image_size=cfg.model.image_size, language=cfg.data.language,
                              num_samples=cfg.data.synthetic_eval_samples)


# ---- the session --------------------------------------------------------------------------------------

@dataclass
class Session:
    args: argparse.Namespace
    cfg: RunConfig
    groups: object
    model_chunks: list[torch.nn.Module]
    tokenizer: object
    bad: BadInputs
    out_dir: Path
    checkpoint: dict
    """checkpoint_info(): format, resolved path and step of the evaluated weights."""

    def write(self, task: str, name: str, report: dict) -> None:
        """Rank 0 writes results.json / results.md and prints the result once (the log line is at debug level)."""
        import torch.distributed as dist

        from m2megatron.eval.results import markdown_table, write_results

        entry = {"task": task, "name": name, **report, "skipped": self.bad.counts(),
                 "checkpoint": self.args.checkpoint, **self.checkpoint,
                 "preset": self.cfg.model.preset, "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                 "tensor_parallel": self.cfg.parallel.tensor_parallel,
                 "pipeline_parallel": self.cfg.parallel.pipeline_parallel}
        log.debug("%s %s: %s", task, name, {k: round(v, 2) for k, v in report["metrics"].items()})
        if not dist.is_initialized() or dist.get_rank() == 0:
            json_path, _ = write_results(self.out_dir, entry)
            print(markdown_table([entry]))
            print(f"results written to {json_path}", flush=True)


@contextlib.contextmanager
def session(parser: argparse.ArgumentParser):
    """Parse, fit the layout to the launch, start the process groups, build the model; shut down at the end."""
    from m2megatron.parallel import initialize, read_launch_env, seed_everything, shutdown

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args, overrides = parser.parse_known_args()
    cfg = load_config(args.config, overrides, preset_name=args.preset)
    cfg = fit_layout(cfg, read_launch_env().world_size, explicit_layout_keys(overrides))
    groups = initialize(cfg.parallel)
    try:
        cfg.validate(world_size=groups.layout.world_size)
        seed_everything(cfg.train.seed, groups)
        cfg, chunks = build_eval_model(cfg, groups, args.checkpoint, args.checkpoint_format)
        info = checkpoint_info(args.checkpoint, args.checkpoint_format)
        out_dir = Path(args.out or cfg.eval.output_dir or Path(cfg.train.run_dir) / "eval")
        yield Session(args=args, cfg=cfg, groups=groups, model_chunks=chunks,
                      tokenizer=resolve_tokenizer(cfg, args.tokenizer), bad=BadInputs(cfg.eval.on_bad_input),
                      out_dir=out_dir, checkpoint=info)
    finally:
        shutdown()
