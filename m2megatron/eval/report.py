"""The run report: every evaluated checkpoint and set of a run directory in one table, and a plot.

    python -m m2megatron.eval.report RUN_DIR      → RUN_DIR/report.md, report.json, report.png

It reads what training and the launchers write:
- RUN_DIR/metrics.jsonl: the training loss per logged step, and the `eval/<set>/<metric>` entries of
  evaluation during training (m2megatron/eval/during_training.py);
- RUN_DIR/results.json: the end-of-training evaluation (a flat metrics dict with its step);
- every other results.json below RUN_DIR: the launchers' results (e.g. RUN_DIR/eval/results.json),
  with the checkpoint and step they evaluated.

report.png plots the training loss and, against step, R@1 (both directions) of every retrieval set and
top-1 of every zero-shot set (results without a known step, e.g. a released checkpoint, are in the
tables only); below them, the phase times (ms per step, the slowest rank's) and memory (GiB, max over
ranks) of metrics.jsonl's `time/<phase>/max_ms` and `mem/*` keys (docs/TRAINING.md).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from m2megatron.eval.metrics import RETRIEVAL_KEYS
from m2megatron.eval.results import RETRIEVAL_COLUMNS, ZEROSHOT_COLUMNS

log = logging.getLogger("m2megatron.eval")
ZEROSHOT_KEYS = ("top1", "top5")
_TITLES = {"retrieval": ("Image–text retrieval (%)", RETRIEVAL_COLUMNS),
           "zeroshot": ("Zero-shot classification (%)", ZEROSHOT_COLUMNS)}


def _task(metrics: dict) -> str:
    return "retrieval" if any(k in metrics for k in RETRIEVAL_KEYS) else "zeroshot"


def read_metrics_jsonl(path: Path) -> list[dict]:
    """The records of metrics.jsonl; a bad line is an error naming it (a cut-off last line is skipped)."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                log.warning("%s:%d: cut-off last line (a run stopped mid-write?), skipped", path, number)
                continue
            raise ValueError(f"report: {path}:{number} is not JSON") from None
        if not isinstance(record, dict) or "step" not in record:
            raise ValueError(f"report: {path}:{number} is not a metrics record with a 'step'")
        records.append(record)
    return records


def _eval_rows(values: dict, step, source: str, checkpoint: str) -> list[dict]:
    """Rows of the `eval/<set>/<metric>` keys of one record (during training, or a results.json of that form)."""
    from m2megatron.eval.during_training import by_set

    rows = []
    for name, entries in by_set(values).items():
        metrics = {k: v for k, v in entries.items() if k in RETRIEVAL_KEYS or k in ZEROSHOT_KEYS}
        skipped = {k.removeprefix("skipped_"): int(v) for k, v in entries.items() if k.startswith("skipped_")}
        if metrics:
            rows.append({"step": step, "source": source, "checkpoint": checkpoint, "task": _task(metrics),
                         "set": name, "metrics": metrics, "skipped": skipped})
    return rows


def _end_of_training_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise ValueError(f"report: {path} is not valid JSON") from None
    if isinstance(results, list):
        return _launcher_rows(path, results)
    source = "end of training"
    if any(k.startswith("eval/") for k in results):
        return _eval_rows(results, results.get("step"), source, "in memory")
    metrics = {k: results[k] for k in RETRIEVAL_KEYS if k in results}
    return [{"step": results.get("step"), "source": source, "checkpoint": "in memory", "task": "retrieval",
             "set": results.get("set", "synthetic"), "metrics": metrics, "skipped": {}}] if metrics else []


def _launcher_rows(path: Path, entries) -> list[dict]:
    if not isinstance(entries, list):
        raise ValueError(f"report: {path} does not hold a list of launcher results")
    rows = []
    for e in entries:
        if not isinstance(e, dict) or "metrics" not in e or "task" not in e:
            raise ValueError(f"report: {path} has an entry without 'task' and 'metrics'")
        rows.append({"step": e.get("step"), "source": str(path.parent), "task": e["task"], "set": e.get("name", "?"),
                     "checkpoint": e.get("checkpoint_path") or e.get("checkpoint") or e.get("checkpoint_format"),
                     "metrics": e["metrics"], "skipped": e.get("skipped", {})})
    return rows


def collect(run_dir: str | Path) -> dict:
    """{"rows": [every evaluated checkpoint × set], "loss": {"steps", "values"}} of a run directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"report: run directory {run_dir} does not exist")
    records = read_metrics_jsonl(run_dir / "metrics.jsonl")
    rows = [r for rec in records for r in _eval_rows(rec, rec["step"], "during training", "in memory")]
    rows += _end_of_training_rows(run_dir / "results.json")
    for path in sorted(run_dir.rglob("results.json")):
        if path != run_dir / "results.json":
            rows += _launcher_rows(path, json.loads(path.read_text(encoding="utf-8")))
    loss = [(r["step"], r["loss"]) for r in records if "loss" in r]
    return {"run_dir": str(run_dir.resolve()), "rows": rows,
            "loss": {"steps": [s for s, _ in loss], "values": [v for _, v in loss]},
            "mixture": _mixture(records, run_dir / "config.json"),
            "phases": _step_series(records, "time/", "/max_ms"), "memory": _step_series(records, "mem/", "_gb")}


def _mixture(records: list[dict], config_path: Path) -> list[dict]:
    """The realized data mixture of the last record with samples_seen/<source> keys against the configured
    weights (config.json's data.sources; data.shards is one source "default"): one row per source and
    per language ("lang/<tag>", no weight)."""
    last = next((r for r in reversed(records) if any(k.startswith("samples_seen/") for k in r)), None)
    if last is None:
        return []
    seen = {k.removeprefix("samples_seen/"): float(v) for k, v in last.items() if k.startswith("samples_seen/")}
    weights = {"default": 1.0}
    if config_path.is_file():
        sources = json.loads(config_path.read_text(encoding="utf-8")).get("data", {}).get("sources") or []
        weights = {s["name"]: float(s["weight"]) for s in sources} or weights
    rows = []
    for kind, names in (("source", [k for k in seen if not k.startswith("lang/")]),
                        ("language", [k for k in seen if k.startswith("lang/")])):
        total = sum(seen[k] for k in names) or 1.0
        for k in names:
            weight = weights.get(k) if kind == "source" else None
            rows.append({"kind": kind, "name": k.removeprefix("lang/"), "step": last["step"], "samples": int(seen[k]),
                         "share": seen[k] / total,
                         "weight_share": None if weight is None else weight / sum(weights.values())})
    return rows


def _step_series(records: list[dict], prefix: str, suffix: str) -> dict[str, dict[str, list]]:
    """{name: {"steps", "values"}} of the keys `<prefix><name><suffix>` of the training records."""
    series: dict[str, dict[str, list]] = {}
    for record in records:
        for key, value in record.items():
            if key.startswith(prefix) and key.endswith(suffix):
                entry = series.setdefault(key[len(prefix):-len(suffix)], {"steps": [], "values": []})
                entry["steps"].append(record["step"])
                entry["values"].append(value)
    return series


def _phase_table(report: dict) -> list[str]:
    """Mean and last of each phase's slowest-rank time per step, and the memory maxima."""
    phases, memory = report.get("phases", {}), report.get("memory", {})
    if not phases and not memory:
        return []
    out = []
    if phases:
        out += ["## Step time by phase (ms per step, slowest rank)", "", "| phase | mean | last |", "|---|---:|---:|"]
        for name, s in sorted(phases.items(), key=lambda item: -sum(item[1]["values"])):
            out.append(f"| {name} | {sum(s['values']) / len(s['values']):.1f} | {s['values'][-1]:.1f} |")
        out.append("")
    if memory:
        out += ["Memory (GiB, max over ranks and steps): "
                + ", ".join(f"{name} {max(s['values']):.2f}" for name, s in memory.items()), ""]
    return out


def markdown(report: dict, plot_name: str | None) -> str:
    loss = report["loss"]
    out = [f"# Run report: {report['run_dir']}", ""]
    if loss["steps"]:
        out += [f"Training: {len(loss['steps'])} logged steps, loss {loss['values'][0]:.4f} at step "
                f"{loss['steps'][0]} → {loss['values'][-1]:.4f} at step {loss['steps'][-1]} (metrics.jsonl).", ""]
    for task, (title, columns) in _TITLES.items():
        rows = [r for r in report["rows"] if r["task"] == task]
        if not rows:
            continue
        out += [f"## {title}", "", "| step | evaluated by | checkpoint | set | " + " | ".join(c[1] for c in columns)
                + " | skipped |", "|---:|---|---|---|" + "---:|" * (len(columns) + 1)]
        for r in rows:
            values = [f"{r['metrics'][k]:.2f}" if k in r["metrics"] else "–" for k, _ in columns]
            step = "–" if r["step"] is None else str(r["step"])
            out.append(f"| {step} | {r['source']} | {r['checkpoint']} | {r['set']} | " + " | ".join(values)
                       + f" | {sum(r['skipped'].values())} |")
        out.append("")
    if not report["rows"]:
        out += ["No evaluation results found.", ""]
    if report.get("mixture"):
        out += [f"## Data mixture (samples seen by step {report['mixture'][0]['step']})", "",
                "| source / language | samples | realized share | weight share |", "|---|---:|---:|---:|"]
        for r in report["mixture"]:
            weight = "–" if r["weight_share"] is None else f"{r['weight_share']:.3f}"
            name = r["name"] if r["kind"] == "source" else f"language {r['name']}"
            out.append(f"| {name} | {r['samples']} | {r['share']:.3f} | {weight} |")
        out.append("")
    out += _phase_table(report)
    if plot_name:
        out += [f"![loss, R@1 and top-1, phase times and memory against step]({plot_name})", ""]
    return "\n".join(out)


def _series(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Curves against step: '<set> I→T R@1', '<set> T→I R@1', '<set> top-1'."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        if r["step"] is None:
            continue
        keys = (("i2t_r1", "I→T R@1"), ("t2i_r1", "T→I R@1")) if r["task"] == "retrieval" else (("top1", "top-1"),)
        for key, label in keys:
            if key in r["metrics"]:
                curves.setdefault(f"{r['set']} {label}", []).append((int(r["step"]), float(r["metrics"][key])))
    return {name: sorted(points) for name, points in curves.items()}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ((loss_ax, eval_ax), (time_ax, mem_ax)) = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
    loss = report["loss"]
    loss_ax.plot(loss["steps"], loss["values"], color="black", linewidth=1)
    loss_ax.set(title="training loss", xlabel="step", ylabel="loss")
    curves = _series(report["rows"])
    for name, points in curves.items():
        steps, values = zip(*points)
        eval_ax.plot(steps, values, marker="o", linestyle="--" if "T→I" in name else "-", label=name)
    eval_ax.set(title="R@1 and top-1", xlabel="step", ylabel="%", ylim=(0, 100))
    if curves:
        eval_ax.legend(fontsize="small")
    else:
        eval_ax.text(0.5, 0.5, "no evaluation with a known step", ha="center", transform=eval_ax.transAxes)
    _plot_series(time_ax, report.get("phases", {}), "phase times (slowest rank)", "ms per step")
    _plot_series(mem_ax, report.get("memory", {}), "memory (max over ranks)", "GiB")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_series(ax, series: dict[str, dict[str, list]], title: str, unit: str) -> None:
    for name, s in series.items():
        ax.plot(s["steps"], s["values"], label=name, linewidth=1)
    ax.set(title=title, xlabel="step", ylabel=unit)
    if series:
        ax.legend(fontsize="x-small")
    else:
        ax.text(0.5, 0.5, "not in metrics.jsonl", ha="center", transform=ax.transAxes)


def write_report(run_dir: str | Path) -> dict[str, Path]:
    """Write report.md, report.json and report.png into `run_dir`; returns their paths."""
    run_dir = Path(run_dir)
    report = collect(run_dir)
    paths = {"markdown": run_dir / "report.md", "json": run_dir / "report.json", "plot": run_dir / "report.png"}
    plot(report, paths["plot"])
    paths["markdown"].write_text(markdown(report, paths["plot"].name), encoding="utf-8")
    paths["json"].write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m m2megatron.eval.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run directory (train.run_dir)")
    args = parser.parse_args()
    paths = write_report(args.run_dir)
    print(f"report: {paths['markdown']} ({paths['json'].name}, {paths['plot'].name})")
    return 0


if __name__ == "__main__":
    from m2megatron.eval.run_command import run

    run(main)
