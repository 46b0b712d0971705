"""What both eval entry points share: arguments, process groups, the model stage, its weights, the
tokenizer, the synthetic held-out set, and writing results on rank 0.

    with session(parser) as s:          # s.cfg, s.groups, s.model, s.tokenizer, s.bad, s.args
        report = ...
        s.write("retrieval", name, report)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from m2megatron.cli import UserError
from m2megatron.config import RunConfig, load_config
from m2megatron.eval.inputs import BadInputs

log = logging.getLogger("m2megatron.eval")
CHECKPOINT_FORMATS = ("auto", "ours", "consolidated", "reference", "none")


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


def build_stage(cfg: RunConfig, groups) -> list:
    """This rank's stage modules (one per virtual stage), on the runtime device, weights not yet loaded."""
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
        raise UserError("eval: --checkpoint is required (or --checkpoint-format none for seeded random weights)")
    path = Path(checkpoint)
    if not path.exists():
        raise UserError(f"eval: checkpoint {path} does not exist")
    fmt = _detect_format(path) if fmt == "auto" else fmt
    if fmt == "ours":
        if not path.is_dir():
            raise UserError(f"eval: {path} is not a checkpoint directory (--checkpoint-format ours)")
        return cfg, fmt, None
    from m2megatron.checkpoint.files import load_any

    heads = cfg.model.num_attention_heads if cfg.model.preset != "tiny" else None
    file_cfg, full, _ = load_any(path, num_heads=heads)
    model = dataclasses.replace(file_cfg, layer_spec=cfg.model.layer_spec, fp8=cfg.model.fp8)
    return dataclasses.replace(cfg, model=model), fmt, full


def load_weights(modules: list, cfg: RunConfig, groups, checkpoint: str | None, fmt: str, full: dict | None) -> None:
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


def resolve_tokenizer(cfg: RunConfig, explicit: str | None):
    from m2megatron.data.tokenizer import Tokenizer

    path = explicit or cfg.data.tokenizer
    if path is None:
        if cfg.data.source != "synthetic":
            raise UserError("eval: no tokenizer; pass --tokenizer sp.model or set data.tokenizer")
        from m2megatron.data.sp_train import synthetic_tokenizer_path

        path = synthetic_tokenizer_path(Path(cfg.train.run_dir))
    return Tokenizer(path, cfg.model.max_text_len)


def synthetic_eval_set(cfg: RunConfig) -> tuple[list, list[list[str]]]:
    """The held-out synthetic set of the config: uint8 images and one caption each."""
    from m2megatron.data.synthetic import SyntheticScenes

    scenes = SyntheticScenes(seed=cfg.train.seed, image_size=cfg.model.image_size, language=cfg.data.language,
                             split="eval")
    samples = [scenes[i] for i in range(cfg.data.synthetic_eval_samples)]
    return [s.image for s in samples], [[s.caption] for s in samples]


@dataclass
class Session:
    args: argparse.Namespace
    cfg: RunConfig
    groups: object
    model: list
    """This rank's stage modules (one per virtual stage)."""
    tokenizer: object
    bad: BadInputs
    out_dir: Path
    checkpoint_format: str

    def write(self, task: str, name: str, report: dict) -> None:
        """Rank 0 writes results.json / results.md; every rank logs the metrics."""
        import torch.distributed as dist

        from m2megatron.eval.results import markdown_table, write_results

        entry = {"task": task, "name": name, **report, "skipped": self.bad.counts(),
                 "checkpoint": self.args.checkpoint, "checkpoint_format": self.checkpoint_format,
                 "preset": self.cfg.model.preset, "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                 "tensor_parallel": self.cfg.parallel.tensor_parallel,
                 "pipeline_parallel": self.cfg.parallel.pipeline_parallel}
        log.info("%s %s: %s", task, name, {k: round(v, 2) for k, v in report["metrics"].items()})
        if not dist.is_initialized() or dist.get_rank() == 0:
            json_path, _ = write_results(self.out_dir, entry)
            print(markdown_table([entry]))
            print(f"results written to {json_path}", flush=True)


@contextlib.contextmanager
def session(parser: argparse.ArgumentParser):
    """Parse, start the process groups, build and load the model, then shut down whatever happens."""
    from m2megatron.parallel import initialize, seed_everything, shutdown

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args, overrides = parser.parse_known_args()
    cfg = load_config(args.config, overrides, preset_name=args.preset)
    groups = initialize(cfg.parallel)
    try:
        cfg.validate(world_size=groups.layout.world_size)
        seed_everything(cfg.train.seed, groups)
        cfg, fmt, full = resolve_weights(cfg, args.checkpoint, args.checkpoint_format)
        model = build_stage(cfg, groups)
        load_weights(model, cfg, groups, args.checkpoint, fmt, full)
        del full
        out_dir = Path(args.out or cfg.eval.output_dir or Path(cfg.train.run_dir) / "eval")
        tokenizer = resolve_tokenizer(cfg, args.tokenizer)
        try:
            yield Session(args=args, cfg=cfg, groups=groups, model=model, tokenizer=tokenizer,
                          bad=BadInputs(cfg.eval.on_bad_input), out_dir=out_dir, checkpoint_format=fmt)
        except ValueError as exc:  # bad input files: one line, not a traceback
            raise UserError(str(exc)) from None
    finally:
        shutdown()
