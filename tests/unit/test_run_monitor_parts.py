"""The parts of the run monitor on one process: phase timers and their levels, the straggler and spike
detectors, the log lines, and the wandb writer (a stub module: wandb is not in the test environment)."""

from __future__ import annotations

import sys
import time
import types

import pytest
import torch
from megatron.core.timers import DummyTimer

from m2megatron.config import ConfigError, load_config
from m2megatron.runtime.timers import PhaseTimer, PhaseTimers
from m2megatron.train.metrics import MetricsWriter, log_lines
from m2megatron.train.spikes import SpikeDetector, spike_line
from m2megatron.train.stragglers import StragglerDetector

pytestmark = pytest.mark.unit


def test_the_level_chooses_the_timers_and_megatrons_calls_fit():
    timers = PhaseTimers(1, torch.device("cpu"))
    assert isinstance(timers("step"), PhaseTimer) and isinstance(timers("forward-backward", log_level=1), PhaseTimer)
    assert isinstance(timers("forward-compute", log_level=2), DummyTimer)  # per microbatch: level 2
    assert "forward-recv" not in timers.names() and {"step", "data-wait", "loss"} <= set(timers.names())
    timers = PhaseTimers(2, torch.device("cpu"))
    timers("forward-compute", log_level=2).start()  # as Megatron's schedules call it: level on start only
    timers("forward-compute").stop()
    assert "forward-recv" in timers.names()


def test_a_cpu_phase_is_the_host_wall_time_summed_over_the_interval():
    timers = PhaseTimers(1, torch.device("cpu"))
    for _ in range(2):
        timers("data-wait").start()
        time.sleep(0.02)
        timers("data-wait").stop()
    seconds, never = timers.read(["data-wait", "optimizer"])
    assert 0.04 <= seconds < 0.5 and never == 0.0
    assert timers.read(["data-wait"]) == [0.0]  # read resets
    with pytest.raises(RuntimeError, match="stopped before it started"):
        timers("step").stop()
    with timers.paused():  # evaluation between steps: nothing is timed
        assert isinstance(timers("forward-backward", log_level=1), DummyTimer)
    assert isinstance(timers("forward-backward", log_level=1), PhaseTimer)


def _phases(slow_rank: int | None, extra: float = 0.5) -> dict[str, list[float]]:
    """Four ranks' seconds over an interval of 2 steps: the slow one waits for data, the others in the loss."""
    data = [0.01] * 4
    loss = [extra + 0.01] * 4
    if slow_rank is not None:
        data[slow_rank], loss[slow_rank] = extra + 0.01, 0.01
    return {"step": [1.0] * 4, "data-wait": data, "forward-backward": [0.9] * 4, "loss": loss,
            "optimizer": [0.05] * 4}


def test_a_rank_slow_for_several_intervals_is_named_with_its_host_and_slowest_phase():
    detector = StragglerDetector(factor=1.5, intervals=2)
    hosts = lambda: ["n0", "n0", "n1", "n1"]  # noqa: E731
    assert detector.observe(_phases(None), 2, hosts) == []
    assert detector.observe(_phases(2), 2, hosts) == []  # one slow interval is not yet a straggler
    (line,) = detector.observe(_phases(2), 2, hosts)
    assert line.startswith("straggler: rank 2 on n1 has been slow for 2 log intervals")
    assert "slowest phase data wait (+250.0 ms/step over the median)" in line
    assert detector.observe(_phases(None), 2, hosts) == [] and detector.slow_for == {}
    assert detector.observe(_phases(1), 2, hosts) == []  # a new streak starts from one


def test_a_loss_spike_and_a_grad_norm_jump_are_flagged_and_kept_out_of_the_statistics():
    detector = SpikeDetector(sigma=4.0, window=50, min_steps=10, grad_norm_factor=5.0)
    noise = torch.Generator().manual_seed(0)
    losses = (2.0 - 0.01 * torch.arange(30) + 0.05 * torch.randn(30, generator=noise)).tolist()
    assert all(detector.loss_spike(x) is None and detector.grad_norm_jump(1.0 + 0.1 * x) is None for x in losses)
    assert "sigma above the running mean" in detector.loss_spike(4.0)
    assert len(detector.losses) == 30  # the spike did not enter
    assert "x the running mean" in detector.grad_norm_jump(50.0)
    assert detector.loss_spike(float("nan")) is None  # non-finite steps are the NaN guard's business
    assert SpikeDetector(sigma=0, window=5, min_steps=1, grad_norm_factor=0).loss_spike(1e9) is None


def test_a_spike_line_names_the_shards_and_the_first_keys():
    keys = [f"/data/shard-{i % 2}.tar:sample{i}" for i in range(10)]
    line = spike_line(7, "loss 9 is 8 sigma above", keys)
    assert line.startswith("spike at step 7: loss 9 is 8 sigma above; shards /data/shard-0.tar, /data/shard-1.tar;")
    assert "sample7" in line and "sample8" not in line and "(10 in all, spikes.jsonl)" in line
    assert spike_line(7, "why", []).endswith("no sample keys (the loader gave none)")


def test_the_log_lines_put_phase_times_and_memory_on_their_own_lines():
    lines = log_lines({"step": 4, "loss": 1.5, "time/data_wait/min_ms": 1.0, "time/data_wait/max_ms": 12.25,
                       "time/data_wait/max_rank": 3, "time/pipeline_wait_share": 0.1, "mem/cpu_rss_gb": 0.5})
    assert lines == ["step 4 | loss 1.5 | time/pipeline_wait_share 0.1",
                     "  time ms/step, max over ranks @rank: data_wait 12.2@3",
                     "  memory, max over ranks: cpu_rss_gb 0.5"]


class _StubRun:
    def __init__(self, calls):
        self.calls = calls

    def log(self, metrics, step):
        self.calls.append(("log", dict(metrics), step))

    def finish(self):
        self.calls.append(("finish",))


def test_wandb_gets_the_tensorboard_names_and_a_resumed_run_keeps_its_id(tmp_path, monkeypatch):
    calls = []
    stub = types.ModuleType("wandb")
    stub.init = lambda **kwargs: calls.append(("init", kwargs)) or _StubRun(calls)
    monkeypatch.setitem(sys.modules, "wandb", stub)
    settings = {"project": "m2", "name": None, "config": {"train": {"seed": 1}}}
    for step in (2, 4):
        writer = MetricsWriter(tmp_path, enabled=True, tensorboard=False, total_steps=4, progress=False,
                               wandb=settings)
        writer.write(step, {"loss": 1.0, "time/step/max_ms": 3.0})
        writer.close()
    first, second = [c[1] for c in calls if c[0] == "init"]
    assert first["id"] == second["id"] == (tmp_path / "wandb_run_id").read_text().strip()
    assert first["project"] == "m2" and first["resume"] == "allow" and first["name"] == tmp_path.name
    assert [c[1:] for c in calls if c[0] == "log"] == [({"train/loss": 1.0, "time/step/max_ms": 3.0}, 2),
                                                       ({"train/loss": 1.0, "time/step/max_ms": 3.0}, 4)]
    assert calls[-1] == ("finish",)


def test_wandb_unset_imports_nothing_and_set_without_the_package_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # an import of it raises ImportError
    MetricsWriter(tmp_path, enabled=True, tensorboard=False, total_steps=1, progress=False).close()
    with pytest.raises(ImportError, match="logging.wandb_project='m2' needs the wandb package"):
        MetricsWriter(tmp_path, enabled=True, tensorboard=False, total_steps=1, progress=False,
                      wandb={"project": "m2", "name": None, "config": {}})


@pytest.mark.parametrize("override,needle", [
    ("--logging.timers=3", "logging.timers: must be 0, 1 or 2"),
    ("--logging.straggler_factor=1.0", "logging.straggler_factor: must be > 1"),
    ("--logging.spike_sigma=-1", "logging.spike_sigma: must be >= 0"),
])
def test_bad_logging_settings_name_themselves(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(overrides=[override]).validate()


def test_the_run_report_has_a_panel_of_phase_times_and_memory(tmp_path):
    import json

    from m2megatron.eval.report import write_report

    records = [{"step": s, "loss": 3.0 - s / 10, "time/step/max_ms": 100.0 + s, "time/step/max_rank": 1,
                "time/data_wait/max_ms": 10.0 * s, "mem/cpu_rss_gb": 0.5 + s / 100, "mem/cpu_rss_gb_rank": 0}
               for s in (2, 4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    paths = write_report(tmp_path)
    report = json.loads(paths["json"].read_text())
    assert report["phases"] == {"step": {"steps": [2, 4], "values": [102.0, 104.0]},
                                "data_wait": {"steps": [2, 4], "values": [20.0, 40.0]}}
    assert report["memory"] == {"cpu_rss": {"steps": [2, 4], "values": [0.52, 0.54]}}
    md = paths["markdown"].read_text()
    assert "| step | 103.0 | 104.0 |" in md and "| data_wait | 30.0 | 40.0 |" in md
    assert "Memory (GiB, max over ranks and steps): cpu_rss 0.54" in md
