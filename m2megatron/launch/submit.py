"""`python -m m2megatron.launch.submit [--kind train|eval|reshard] [--config RECIPE.yaml] [--eval]
[--dry-run] [--after JOBID] [--section.field=value ...] [-- MODULE ARGS ...]`

Resolves the run config (recipe + overrides, the `launch.*` section included), validates it for the
job's world size, makes the paths in it absolute, snapshots the source tree into `<run_dir>/code`,
writes the resolved config to `<run_dir>/config.yaml`, renders `<run_dir>/slurm/<kind>.sbatch` and
submits it with sbatch. `--eval` also submits the eval job with `--dependency=afterok:<train job>`.
`--dry-run` does everything but sbatch. Before a training job is submitted, its layout is checked by the
trainer's dry run on this machine (every rank class built on the meta device, `python -m m2megatron.train
--dry-run --all-ranks`): any problem (memory, loss groups across nodes, microbatches < PP, unbalanced
stages, parameter count) refuses the submission with its one-line reason; `--no-layout-check` skips it.
Its data is checked first (every source expands to readable shards, at least one per DP rank; the tokenizer
loads; the jsonl and eval sets exist: m2megatron.train.data_checks), one line per problem;
`--no-data-check` skips that.
Prints one JSON line: run directory, scripts and job ids.
Arguments after `--` replace the module's configured arguments (required for --kind reshard: the
reshard tool's `SRC DST --tp T --pp P [--vp V] [--no-optimizer]`, checked before anything is queued;
{run_dir} is replaced by the run directory).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from m2megatron.cli import UserError, run_main
from m2megatron.config import RunConfig, load_config
from m2megatron.launch.render import KINDS, SOURCE_ROOT, default_spec, expand_args, render
from m2megatron.launch.snapshot import snapshot_code

RESHARD_MODULE = "m2megatron.checkpoint.reshard"
"""The reshard tool; its arguments are checked before a reshard job is queued."""


@dataclass(kw_only=True)
class Submission:
    run_dir: Path
    scripts: dict[str, Path] = field(default_factory=dict)
    job_ids: dict[str, str | None] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"run_dir": str(self.run_dir), "scripts": {k: str(v) for k, v in self.scripts.items()},
                           "job_ids": self.job_ids})


def absolute_paths(cfg: RunConfig, base: Path) -> RunConfig:
    """Make the path settings absolute against `base`: the job runs from the code snapshot, not from here."""
    def fix(path: str | None) -> str | None:
        return None if path is None else str((base / Path(path).expanduser()).resolve())

    train = dataclasses.replace(cfg.train, run_dir=fix(cfg.train.run_dir))
    load = cfg.checkpoint.load
    checkpoint = dataclasses.replace(cfg.checkpoint, save_dir=fix(cfg.checkpoint.save_dir),
                                     load=load if load in (None, "auto") else fix(load))
    def fix_shard(pattern: str) -> str:  # pipe: commands and URLs stay; @list.txt keeps its @
        if pattern.startswith("pipe:") or "://" in pattern:
            return pattern
        return "@" + fix(pattern[1:]) if pattern.startswith("@") else fix(pattern)

    sources = [dataclasses.replace(s, shards=[fix_shard(p) for p in s.shards]) for s in cfg.data.sources]
    data = dataclasses.replace(cfg.data, shards=[fix_shard(s) for s in cfg.data.shards], sources=sources,
                               tokenizer=fix(cfg.data.tokenizer), jsonl=fix(cfg.data.jsonl),
                               image_root=fix(cfg.data.image_root))
    launch = dataclasses.replace(cfg.launch, venv=fix(cfg.launch.venv))
    return dataclasses.replace(cfg, train=train, checkpoint=checkpoint, data=data, launch=launch)


def sbatch(script: Path, dependency: str | None = None) -> str:
    """Submit `script`; return the job id."""
    exe = shutil.which("sbatch")
    if exe is None:
        raise UserError("sbatch not found on PATH: submit from a Slurm login node, or use --dry-run")
    cmd = [exe, "--parsable"] + ([f"--dependency={dependency}"] if dependency else []) + [str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"sbatch {script} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip().split(";")[0]


def prepare_run_dir(cfg: RunConfig, kind: str) -> tuple[Path, Path]:
    """Write config.yaml and the code snapshot; return (run_dir, code_dir)."""
    run_dir = Path(cfg.train.run_dir)
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)  # sbatch --output needs the folder to exist
    (run_dir / "slurm").mkdir(exist_ok=True)
    if kind == "train" or not (run_dir / "config.yaml").exists():
        cfg.save(run_dir)
    if not cfg.launch.snapshot:
        return run_dir, SOURCE_ROOT
    code_dir = run_dir / "code"
    # Training replaces the snapshot; eval and reshard reuse the training run's code when there is one.
    if kind == "train" or not (code_dir / "SNAPSHOT.json").exists():
        snapshot_code(SOURCE_ROOT, code_dir)
    return run_dir, code_dir


def check_layout(run_dir: Path, world_size: int) -> str:
    """The trainer's dry run of the resolved config at `world_size` (a process of its own: it joins a fake
    world). Returns its report (also written to slurm/layout_check.txt); raises UserError on a problem."""
    cmd = [sys.executable, "-m", "m2megatron.train", "--dry-run", "--all-ranks", "--no-data-check", "--config",
           str(run_dir / "config.yaml"), "--world-size", str(world_size)]  # submit checks the data itself
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=SOURCE_ROOT)
    (run_dir / "slurm" / "layout_check.txt").write_text(proc.stdout + proc.stderr)
    problems = [line.removeprefix("problem: ") for line in proc.stdout.splitlines() if line.startswith("problem: ")]
    if proc.returncode == 1 and problems:
        raise UserError("the layout check refuses this job (--no-layout-check skips it):\n  " + "\n  ".join(problems))
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:]
        raise UserError(f"the layout check failed to run ({' '.join(tail)}); see {run_dir / 'slurm/layout_check.txt'}")
    return proc.stdout


def submit(cfg: RunConfig, *, kind: str = "train", chain_eval: bool = False, module_args: list[str] | None = None,
           after: str | None = None, dry_run: bool = False, config_source: str = "a run config",
           layout_check: bool = False, data_check: bool = False) -> Submission:
    """Prepare the run directory, render the job(s) and submit them unless `dry_run`. `layout_check` runs the
    trainer's dry run of a training job first (the command line does unless --no-layout-check); `data_check`
    checks its shards, tokenizer and eval sets (train.data_checks; the command line does unless
    --no-data-check)."""
    if kind not in KINDS:
        raise UserError(f"--kind: {kind!r} is not one of {list(KINDS)}")
    if kind == "reshard" and not module_args:
        raise UserError("--kind reshard: give the reshard tool's arguments after '--'")
    if chain_eval and kind != "train":
        raise UserError("--eval chains an eval job after training; it needs --kind train")
    cfg = absolute_paths(cfg, Path.cwd())
    launch = cfg.launch
    cfg.validate(world_size=launch.world_size(launch.eval_nodes if kind == "eval" else launch.nodes))
    if chain_eval:
        cfg.parallel.validate(launch.world_size(launch.eval_nodes), cfg.model.num_attention_heads,
                              cfg.model.num_layers)
    if kind == "reshard" and launch.reshard_module == RESHARD_MODULE:
        from m2megatron.checkpoint.reshard import check_job_arguments

        check_job_arguments(list(expand_args(module_args, Path(cfg.train.run_dir))), launch.world_size())
    if data_check and kind == "train":
        from m2megatron.train.data_checks import data_problems

        found = data_problems(cfg, cfg.parallel.data_parallel(launch.world_size()))
        if found:
            raise UserError("the data check refuses this job (--no-data-check skips it):\n  " + "\n  ".join(found))
    run_dir, code_dir = prepare_run_dir(cfg, kind)
    if layout_check and kind == "train":
        check_layout(run_dir, launch.world_size())
    result = Submission(run_dir=run_dir)
    jobs = [(kind, module_args)] + ([("eval", None)] if chain_eval else [])
    for job_kind, args in jobs:
        spec = default_spec(job_kind, launch, run_dir, code_dir, args, config_source)
        path = run_dir / "slurm" / f"{job_kind}.sbatch"
        path.write_text(render(spec, launch))
        path.chmod(0o755)
        result.scripts[job_kind] = path
        dependency = f"afterok:{after}" if after else None
        if job_kind == "eval" and chain_eval:
            dependency = f"afterok:{result.job_ids['train']}" if result.job_ids["train"] else None
        result.job_ids[job_kind] = None if dry_run else sbatch(path, dependency)
        _record(run_dir, job_kind, path, result.job_ids[job_kind], dependency)
    return result


def _record(run_dir: Path, kind: str, script: Path, job_id: str | None, dependency: str | None) -> None:
    entry = {"kind": kind, "job_id": job_id, "script": str(script), "dependency": dependency,
             "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with open(run_dir / "slurm" / "jobs.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    module_args = None
    if "--" in argv:
        cut = argv.index("--")
        argv, module_args = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(prog="python -m m2megatron.launch.submit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", default="train", choices=KINDS)
    parser.add_argument("--config", help="YAML recipe (may hold a launch: section)")
    parser.add_argument("--preset", help="model preset: tiny, m2-0.4b, m2-1b, m2-10b")
    parser.add_argument("--eval", action="store_true", help="chain an eval job after training (afterok)")
    parser.add_argument("--after", help="make the (first) job depend on this job id (afterok)")
    parser.add_argument("--dry-run", action="store_true", help="prepare and render, do not call sbatch")
    parser.add_argument("--no-layout-check", action="store_true",
                        help="do not run the trainer's dry run of the layout before submitting a training job")
    parser.add_argument("--no-data-check", action="store_true",
                        help="do not check the shards, tokenizer and eval sets before submitting a training job")
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(args.config, overrides, preset_name=args.preset)
    result = submit(cfg, kind=args.kind, chain_eval=args.eval, module_args=module_args, after=args.after,
                    dry_run=args.dry_run, config_source=args.config or "defaults and command-line overrides",
                    layout_check=not args.no_layout_check, data_check=not args.no_data_check)
    print(result.to_json(), flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
