"""`python -m m2megatron.config [--preset NAME] [--config recipe.yaml] [--section.field=value ...]`

Prints the resolved config as YAML and the parameter count computed from it (no model is built).
The parallel layout is validated against `--world-size N`, or else against the recipe's launch size
launch.nodes × launch.procs_per_node when that is more than one rank; then the layout (TP × PP × DP, VP)
and each pipeline stage's tower layers are printed too. `--describe` lists every field with its documentation.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing

import yaml

from m2megatron.cli import run_main
from m2megatron.config import RunConfig, count_parameters, field_docs, load_config


def describe(cls: type = RunConfig, prefix: str = "") -> list[str]:
    lines = []
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        if dataclasses.is_dataclass(sub):
            lines += describe(type(sub), f"{prefix}{f.name}.")
            continue
        lines.append(f"{prefix}{f.name}: {docs.get(f.name, '')}")
        item = typing.get_args(typing.get_type_hints(cls)[f.name])
        if isinstance(sub, list) and item and dataclasses.is_dataclass(item[0]):  # e.g. data.sources[i].name
            lines += describe(item[0], f"{prefix}{f.name}[i].")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m m2megatron.config", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", help="model preset: tiny, m2-0.4b, m2-1b, m2-10b")
    parser.add_argument("--config", help="YAML recipe")
    parser.add_argument("--world-size", type=int, help="validate the layout for this many ranks")
    parser.add_argument("--describe", action="store_true", help="list every setting with its documentation")
    args, rest = parser.parse_known_args()
    if args.describe:
        print("\n".join(describe()))
        return 0
    cfg = load_config(args.config, rest, preset_name=args.preset)
    world = args.world_size or (cfg.launch.world_size() if cfg.launch.world_size() > 1 else None)
    cfg.validate(world)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    counts = count_parameters(cfg.model)
    print(f"# parameters ({cfg.model.preset}): " + ", ".join(f"{k}={v:,}" for k, v in counts.items()))
    if world is not None:
        print(layout_line(cfg, world, "--world-size" if args.world_size else "launch.nodes × launch.procs_per_node"))
    return 0


def layout_line(cfg: RunConfig, world: int, source: str) -> str:
    """'# layout: ...' with the world size, TP × PP × DP (× VP), microbatches and each stage's tower layers."""
    par = cfg.parallel
    stages = " ".join(f"[{start},{end})" for start, end in par.layer_ranges(cfg.model.num_layers))
    vp = f" × VP {par.virtual_pipeline}" if par.virtual_pipeline else ""
    return (f"# layout ({source} = {world} ranks): TP {par.tensor_parallel} × PP {par.pipeline_parallel} × DP "
            f"{par.data_parallel(world)}{vp}, {cfg.num_microbatches(world)} microbatches per step; tower layers per "
            f"pipeline stage: {stages} (+ the VL block and heads on the last)")


if __name__ == "__main__":
    run_main(main)
