"""MemorySnapshotSession and mfsgd-memory-report: stop points, rank gating, category bytes, offline regeneration."""

import json
import logging
import pickle
import re
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerControl, TrainerState

from llamafactory_mfsgd.memory_snapshot import MemorySnapshotSession
from memory_profiling import report as memory_report

MARKER_NUMEL = 2**21  # an 8 MiB float32 tensor: far above everything the tiny model allocates
MARKER_BYTES = MARKER_NUMEL * 4
MiB = 2**20


def _tiny_model(device="cpu"):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).to(device)


def _param_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _train(session, steps=2, accumulation=1, marker_at=None, device="cpu", start=True):
    """A Trainer-like loop calling the session's hooks in HF Trainer's order.

    `marker_at=(step, micro)` allocates an 8 MiB tensor before that micro-batch and frees it after that
    micro-batch's hook, so it is recorded only if recording was still on then.
    """
    if start:
        session.start()
    model = _tiny_model(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    args = SimpleNamespace(gradient_accumulation_steps=accumulation)
    state, control = TrainerState(), TrainerControl()
    hooks = {"model": model, "optimizer": optimizer}
    session.on_train_begin(args, state, control, **hooks)
    for step in range(steps):
        for micro in range(accumulation):
            marker = torch.ones(MARKER_NUMEL, device=device) if marker_at == (step, micro) else None
            loss = model(torch.randn(16, 32, device=device)).pow(2).mean() / accumulation
            loss.backward()
            if micro < accumulation - 1:
                session.on_substep_end(args, state, control, **hooks)
            else:
                session.on_pre_optimizer_step(args, state, control, **hooks)
                optimizer.step()
                session.on_optimizer_step(args, state, control, **hooks)
                model.zero_grad()
                state.global_step += 1
                session.on_step_end(args, state, control, **hooks)
            del marker
    session.on_train_end(args, state, control, **hooks)
    return model, optimizer


def _summary(directory):
    return json.loads((directory / memory_report.SUMMARY_JSON).read_text())


def test_cpu_session_writes_timeline_png_and_summary_with_parameter_and_adamw_state_bytes(tmp_path):
    session = MemorySnapshotSession(str(tmp_path), stop_step=1, device="cpu")
    model, optimizer = _train(session, steps=2)
    params = _param_bytes(model)
    step_scalars = 4 * len(list(model.parameters()))  # AdamW keeps a float32 `step` per parameter on CPU

    for name in ("memory_timeline_cpu.json", "memory_timeline.png", "memory_summary.md", "memory_summary.json"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "memory_timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = _summary(tmp_path)
    assert summary["method"] == "CPU torch.profiler memory timeline" and summary["device"] == "cpu"
    assert summary["measured"]["parameters"] == params
    assert summary["measured"]["gradients"] == params
    assert summary["measured"]["optimizer_state"] == 2 * params + step_scalars
    # torch.profiler's own categories once the step is over: the parameters and AdamW's exp_avg/exp_avg_sq.
    assert summary["at_stop"]["breakdown"]["parameters"] == params
    assert summary["at_stop"]["breakdown"]["optimizer_state"] == 2 * params + step_scalars
    assert summary["at_stop"]["breakdown"]["gradients"] == 0  # zero_grad(set_to_none) ran before on_step_end
    # Parameters, gradients and optimizer state coexist during the optimizer step.
    assert summary["peak"]["total_bytes"] >= 4 * params
    assert sum(summary["peak"]["breakdown"].values()) == summary["peak"]["total_bytes"]
    markdown = (tmp_path / "memory_summary.md").read_text()
    assert "CPU torch.profiler memory timeline" in markdown
    assert f"({summary['peak']['total_bytes']} bytes)" in markdown
    assert "after optimizer step 1" in summary["stop_reason"]


@pytest.mark.parametrize(("stop_step", "marker_recorded"), [(1, False), (2, True)])
def test_recording_stops_after_stop_step(tmp_path, stop_step, marker_recorded):
    session = MemorySnapshotSession(str(tmp_path), stop_step=stop_step, device="cpu")
    _train(session, steps=3, marker_at=(1, 0))

    assert not session.recording and not torch.autograd._profiler_enabled()
    summary = _summary(tmp_path)
    assert f"after optimizer step {stop_step}" in summary["stop_reason"]
    assert (summary["peak"]["total_bytes"] >= MARKER_BYTES) == marker_recorded


@pytest.mark.parametrize(
    ("stop_accumulation_step", "marker_recorded", "micro_steps"), [(1, False, 1), (2, True, 2), (3, True, 3)]
)
def test_stop_accumulation_step_counts_micro_steps_of_the_first_optimizer_step(
    tmp_path, stop_accumulation_step, marker_recorded, micro_steps
):
    session = MemorySnapshotSession(str(tmp_path), stop_step=1, stop_accumulation_step=stop_accumulation_step)
    model, _ = _train(session, steps=2, accumulation=3, marker_at=(0, 1))

    summary = _summary(tmp_path)
    assert f"after {micro_steps} micro-step(s) of the first optimizer step" in summary["stop_reason"]
    assert (summary["peak"]["total_bytes"] >= MARKER_BYTES) == marker_recorded
    assert summary["measured"]["optimizer_state"] == 0  # stopped before the first optimizer step
    assert summary["measured"]["gradients"] == _param_bytes(model)


def test_stop_accumulation_step_beyond_the_window_stops_at_the_first_optimizer_step(tmp_path, caplog):
    session = MemorySnapshotSession(str(tmp_path), stop_accumulation_step=5)
    with caplog.at_level(logging.WARNING, logger="llamafactory.mfsgd.memory"):
        _train(session, steps=2, accumulation=3, marker_at=(1, 0))

    summary = _summary(tmp_path)
    assert "after 3 micro-step(s)" in summary["stop_reason"]
    assert summary["peak"]["total_bytes"] < MARKER_BYTES
    assert "has only 3 micro-step(s)" in caplog.text


def test_non_zero_rank_records_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    out = tmp_path / "out"
    session = MemorySnapshotSession(str(out), stop_step=1)
    session.start()
    assert not session.recording and not torch.autograd._profiler_enabled()
    _train(session, steps=2, start=False)

    assert not out.exists()
    assert session.files == {}


def test_training_that_ends_early_still_writes_the_recording(tmp_path):
    session = MemorySnapshotSession(str(tmp_path), stop_step=10)
    _train(session, steps=2)

    assert not session.recording
    assert "training ended (global_step=2)" in _summary(tmp_path)["stop_reason"]


def test_on_train_begin_starts_recording_when_start_was_not_called(tmp_path, caplog):
    session = MemorySnapshotSession(str(tmp_path), stop_step=1)
    with caplog.at_level(logging.WARNING, logger="llamafactory.mfsgd.memory"):
        _train(session, steps=1, start=False)

    assert "start() was not called" in caplog.text
    assert _summary(tmp_path)["measured"]["parameters"] > 0


def test_png_failure_only_warns(tmp_path, monkeypatch, caplog):
    def broken_plot(*args):
        raise RuntimeError("no renderer")

    monkeypatch.setattr(memory_report, "plot_cpu_timeline", broken_plot)
    session = MemorySnapshotSession(str(tmp_path), stop_step=1)
    with caplog.at_level(logging.WARNING, logger="memory_profiling"):
        _train(session, steps=2)

    assert "no renderer" in caplog.text
    assert not (tmp_path / "memory_timeline.png").exists()
    assert "memory_timeline.png" not in _summary(tmp_path)["files"]


def test_recording_errors_are_raised(tmp_path, monkeypatch):
    def broken_timeline(profile):
        raise RuntimeError("profiler broke")

    monkeypatch.setattr("memory_profiling.recorder.MemoryProfileTimeline", broken_timeline)
    session = MemorySnapshotSession(str(tmp_path), stop_step=1)
    session.start()
    with pytest.raises(RuntimeError, match="profiler broke"):
        session.stop("test")
    assert not torch.autograd._profiler_enabled()


def test_report_cli_regenerates_identical_summary_from_cpu_json(tmp_path):
    session = MemorySnapshotSession(str(tmp_path / "run"), stop_step=1)
    _train(session, steps=2)
    regenerated = tmp_path / "regenerated"

    assert memory_report.main([str(tmp_path / "run" / "memory_timeline_cpu.json"), "--out", str(regenerated)]) == 0
    assert _summary(regenerated) == _summary(tmp_path / "run")
    assert (regenerated / "memory_summary.md").read_text() == (tmp_path / "run" / "memory_summary.md").read_text()
    assert (regenerated / "memory_timeline.png").is_file()


def test_constructor_validates_arguments(tmp_path):
    with pytest.raises(ValueError, match="stop_step"):
        MemorySnapshotSession(str(tmp_path), stop_step=0)
    with pytest.raises(ValueError, match="stop_accumulation_step"):
        MemorySnapshotSession(str(tmp_path), stop_accumulation_step=-1)
    with pytest.raises(ValueError, match="max_entries"):
        MemorySnapshotSession(str(tmp_path), max_entries=0)
    with pytest.raises(ValueError, match="cuda and cpu"):
        MemorySnapshotSession(str(tmp_path), device="meta")
    session = MemorySnapshotSession(str(tmp_path), device="cpu")
    session.start()
    with pytest.raises(RuntimeError, match="already recording"):
        session.start()
    session.stop("test")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_device_without_cuda_is_refused(tmp_path):
    with pytest.raises(ValueError, match="CUDA is not available"):
        MemorySnapshotSession(str(tmp_path), device="cuda")


# --- CUDA snapshots: a synthetic snapshot in torch's documented format (torch.cuda.memory._snapshot) ---


def _synthetic_snapshot(with_times=True):
    """Device 0: a 2 MiB segment with 256 KiB allocated before recording, then a traced 4 MiB segment.

    Allocated bytes: 0.25 -> 1.25 (alloc A) -> 3.25 (alloc B, the peak) -> 1.25 (B freed) -> 1.75 (alloc C).
    Device 1 has fewer events and must not be picked.
    """
    events = [
        {"action": "segment_alloc", "addr": 0x10000000, "size": 4 * MiB},
        {"action": "alloc", "addr": 0x10000000, "size": 1 * MiB},
        {"action": "alloc", "addr": 0x10100000, "size": 2 * MiB},
        {"action": "free_requested", "addr": 0x10100000, "size": 2 * MiB},
        {"action": "free_completed", "addr": 0x10100000, "size": 2 * MiB},
        {"action": "alloc", "addr": 0x10100000, "size": MiB // 2},
    ]
    for i, event in enumerate(events):
        event.update(stream=0, frames=[])
        if with_times:
            event["time_us"] = 1000 + 500 * i
    segments = [
        {
            "device": 0,
            "address": 0x20000000,
            "total_size": 2 * MiB,
            "blocks": [
                {"size": MiB // 4, "requested_size": MiB // 4, "state": "active_allocated", "frames": []},
                {"size": 2 * MiB - MiB // 4, "state": "inactive"},
            ],
        },
        {
            "device": 0,
            "address": 0x10000000,
            "total_size": 4 * MiB,
            "blocks": [
                {"size": MiB, "requested_size": MiB, "state": "active_allocated", "frames": []},
                {"size": MiB // 2, "requested_size": MiB // 2, "state": "active_awaiting_free", "frames": []},
                {"size": 4 * MiB - MiB - MiB // 2, "state": "inactive"},
            ],
        },
        {
            "device": 1,
            "address": 0x30000000,
            "total_size": 2 * MiB,
            "blocks": [{"size": 64 * MiB, "state": "active_allocated", "frames": []}],
        },
    ]
    device1 = [{"action": "segment_alloc", "addr": 0x30000000, "size": 2 * MiB, "stream": 0, "frames": []}]
    return {"segments": segments, "device_traces": [events, device1]}


MEASURED = {"parameters": MiB, "gradients": MiB // 4, "optimizer_state": MiB // 2, "gradients_at": "test"}


def test_cuda_snapshot_summary_replays_the_allocator_trace():
    summary = memory_report.summarize_cuda_snapshot(_synthetic_snapshot(), {"measured": MEASURED, "max_entries": 6})

    assert summary["method"] == "CUDA caching-allocator snapshot" and summary["device"] == "cuda:0"
    assert summary["peak"]["total_bytes"] == 3 * MiB + MiB // 4
    assert summary["peak"]["time_ms"] == pytest.approx(1.0)  # third event, 2 x 500 us after the first
    assert summary["reserved_peak_bytes"] == 6 * MiB
    assert summary["peak"]["breakdown"] == {
        "parameters": MiB,
        "gradients": MiB // 4,
        "optimizer_state": MiB // 2,
        "activations_and_other": 3 * MiB + MiB // 4 - MiB - MiB // 4 - MiB // 2,
    }
    assert any("max_entries=6" in note for note in summary["notes"])


def test_cuda_snapshot_summary_without_measurements_reports_totals_only():
    summary = memory_report.summarize_cuda_snapshot(_synthetic_snapshot(with_times=False))

    assert summary["peak"]["total_bytes"] == 3 * MiB + MiB // 4
    assert summary["peak"]["time_ms"] is None
    assert set(summary["peak"]["breakdown"].values()) == {None}
    assert not any("max_entries" in note for note in summary["notes"])


def test_cuda_timeline_starts_from_memory_allocated_before_recording():
    timeline = memory_report.cuda_memory_timeline(_synthetic_snapshot(), 0)

    assert [b // (MiB // 4) for b in timeline["allocated"]] == [1, 1, 5, 13, 13, 5, 7]
    assert timeline["reserved"][0] == 2 * MiB and timeline["reserved"][-1] == 6 * MiB


def test_report_cli_renders_summary_png_and_html_from_a_snapshot_pickle(tmp_path):
    snapshot_path = tmp_path / "memory_snapshot.pickle"
    snapshot_path.write_bytes(pickle.dumps(_synthetic_snapshot()))
    memory_report.snapshot_meta_path(snapshot_path).write_text(json.dumps({"measured": MEASURED}))

    assert memory_report.main([str(snapshot_path)]) == 0
    summary = _summary(tmp_path)
    assert summary["peak"]["breakdown"]["parameters"] == MiB
    assert (tmp_path / "memory_timeline.png").read_bytes()[:4] == b"\x89PNG"
    html = (tmp_path / "memory_viz.html").read_text()
    for url in re.findall(r"https://\S+?\.js", html):
        assert any(url in note for note in summary["notes"])  # the summary says what the page downloads
    assert "memory_viz.html" in (tmp_path / "memory_summary.md").read_text()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_session_dumps_snapshot_and_summarizes_it(tmp_path):
    session = MemorySnapshotSession(str(tmp_path), stop_step=1, device="cuda")
    model, optimizer = _train(session, steps=2, device="cuda")
    params = _param_bytes(model)

    for name in ("memory_snapshot.pickle", "memory_snapshot_meta.json", "memory_viz.html", "memory_timeline.png"):
        assert (tmp_path / name).is_file(), name
    summary = _summary(tmp_path)
    assert summary["method"] == "CUDA caching-allocator snapshot"
    breakdown = summary["peak"]["breakdown"]
    assert breakdown["parameters"] == params
    assert breakdown["gradients"] == params
    assert breakdown["optimizer_state"] == 2 * params  # AdamW's `step` stays on the CPU
    assert breakdown["activations_and_other"] >= 0
    meta = json.loads((tmp_path / "memory_snapshot_meta.json").read_text())
    assert summary["peak"]["total_bytes"] <= meta["allocator_peak_allocated_bytes"]
    # History recording is off: new allocations leave the allocator trace unchanged.
    before = [len(trace) for trace in torch.cuda.memory._snapshot()["device_traces"]]
    torch.ones(MARKER_NUMEL, device="cuda")
    assert [len(trace) for trace in torch.cuda.memory._snapshot()["device_traces"]] == before
