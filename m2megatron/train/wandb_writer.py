"""A wandb run beside TensorBoard: the same keys, the same steps. wandb is imported only when configured.

The run id is kept in RUN_DIR/wandb_run_id, so a resumed or requeued training continues the same wandb run.
WANDB_MODE=offline writes under RUN_DIR/wandb without network (`wandb sync` uploads it later).
"""

from __future__ import annotations

import uuid
from pathlib import Path


class WandbWriter:
    def __init__(self, run_dir: str | Path, *, project: str, name: str | None, config: dict):
        try:
            import wandb
        except ImportError:
            raise ImportError(f"logging.wandb_project={project!r} needs the wandb package (pip install wandb), "
                              f"or unset logging.wandb_project") from None
        run_dir = Path(run_dir)
        id_file = run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        self._run = wandb.init(project=project, name=name or run_dir.resolve().name, id=run_id, resume="allow",
                               dir=str(run_dir), config=config)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._run.log(metrics, step=step)

    def close(self) -> None:
        self._run.finish()
