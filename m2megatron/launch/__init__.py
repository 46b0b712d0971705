"""Slurm launch (docs/SLURM.md): `python -m m2megatron.launch.submit` renders launch/templates/*.sbatch from a
run config, snapshots the code into the run directory and submits the jobs. `render` and `snapshot` are the
importable parts; `m2megatron.launch.submit.submit` is the programmatic entry point."""
