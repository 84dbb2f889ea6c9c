"""Readable summaries, PNG timelines and the HTML viewer for recorded memory profiles.

Two kinds of recording come in, both written by :class:`memory_profiling.MemoryRecorder`:

- a CUDA caching-allocator snapshot (`memory_snapshot.pickle`, torch's own format, plus the sidecar
  `memory_snapshot_meta.json` with the tensor sizes the caller measured), and
- a CPU memory timeline from `torch.profiler` (`memory_timeline_cpu.json`, our format: one row of bytes per
  profiler category for every change of the timeline).

Training runs and the `mfsgd-memory-report` command both go through `write_report`, so a report regenerated
offline from a saved file has exactly the numbers the training run wrote. This module needs no torch except
for the HTML viewer (torch's own renderer); matplotlib draws the PNGs.
"""

from __future__ import annotations

import argparse
import json
import logging
import pickle
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger("memory_profiling")

CUDA_METHOD = "CUDA caching-allocator snapshot"
CPU_METHOD = "CPU torch.profiler memory timeline"
# Format tags written into the JSON files (named after the package that first wrote them; saved files keep loading).
CPU_TIMELINE_FORMAT = "llamafactory_mfsgd.cpu_memory_timeline/1"
SUMMARY_FORMAT = "llamafactory_mfsgd.memory_summary/1"

SNAPSHOT_PICKLE = "memory_snapshot.pickle"
CPU_TIMELINE_JSON = "memory_timeline_cpu.json"
SUMMARY_MD = "memory_summary.md"
SUMMARY_JSON = "memory_summary.json"
TIMELINE_PNG = "memory_timeline.png"
VIEWER_HTML = "memory_viz.html"

# Summary groups, in the order the tables list them.
GROUPS = ("parameters", "gradients", "optimizer_state", "activations", "other")
# torch.profiler category (lower-cased enum name) -> summary group; every other category is "other".
_GROUP_OF_CATEGORY = {
    "parameter": "parameters",
    "gradient": "gradients",
    "optimizer_state": "optimizer_state",
    "activation": "activations",
}
_CATEGORY_COLORS = {
    "parameter": "darkgreen",
    "optimizer_state": "goldenrod",
    "input": "black",
    "temporary": "mediumpurple",
    "activation": "red",
    "gradient": "mediumblue",
    "autograd_detail": "royalblue",
    "unknown": "grey",
}
# Allocator actions that change bytes allocated to tensors / bytes reserved from the driver.
_ALLOCATED_DELTA = {"alloc": 1, "free_completed": -1}
_RESERVED_DELTA = {"segment_alloc": 1, "segment_map": 1, "segment_free": -1, "segment_unmap": -1}


def snapshot_meta_path(snapshot_path: str | Path) -> Path:
    """Sidecar file holding what the recorder's caller measured next to a snapshot pickle (`<stem>_meta.json`)."""
    snapshot_path = Path(snapshot_path)
    return snapshot_path.with_name(f"{snapshot_path.stem}_meta.json")


def format_bytes(num_bytes: int | None) -> str:
    """Human-readable size in binary units, e.g. `1.50 MiB`; `n/a` for None."""
    if num_bytes is None:
        return "n/a"
    size = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def pick_cuda_device(snapshot: dict[str, Any]) -> int:
    """Index of the device with the most allocator events (the lowest on ties; 0 for an empty snapshot)."""
    traces = snapshot.get("device_traces") or []
    if any(traces):
        return max(range(len(traces)), key=lambda i: (len(traces[i]), -i))
    devices = sorted(segment.get("device", 0) for segment in snapshot.get("segments", []))
    return devices[0] if devices else 0


def _cuda_device_index(snapshot: dict[str, Any], meta: dict[str, Any] | None) -> int:
    """The device recorded (from `meta`), else the busiest device of the snapshot."""
    return (meta or {}).get("device_index", pick_cuda_device(snapshot))


def cuda_memory_timeline(snapshot: dict[str, Any], device_index: int) -> dict[str, Any]:
    """Bytes allocated and reserved over time on one device, replayed from a CUDA snapshot.

    The replay runs backwards from the final state in `segments` (blocks in an active state are allocated,
    segment sizes are reserved), undoing each traced `alloc`/`free_completed` and segment event. Memory that
    existed before recording started, or whose events fell out of the allocator's ring buffer, is therefore
    still counted. Entry 0 is the state before the first traced event, entry i + 1 the state after event i.
    `timed` is False when the trace has no `time_us` and times are event indices instead.
    """
    traces = snapshot.get("device_traces") or []
    events = traces[device_index] if device_index < len(traces) else []
    segments = [s for s in snapshot.get("segments", []) if s.get("device", 0) == device_index]
    allocated = sum(b["size"] for s in segments for b in s.get("blocks", []) if b["state"].startswith("active"))
    reserved = sum(s["total_size"] for s in segments)
    allocated_after = [allocated]
    reserved_after = [reserved]
    for event in reversed(events):
        allocated -= _ALLOCATED_DELTA.get(event["action"], 0) * event.get("size", 0)
        reserved -= _RESERVED_DELTA.get(event["action"], 0) * event.get("size", 0)
        allocated_after.append(allocated)
        reserved_after.append(reserved)
    allocated_after.reverse()
    reserved_after.reverse()
    timed = bool(events) and all("time_us" in e for e in events)
    times = [float(e["time_us"]) for e in events] if timed else [float(i) for i in range(1, len(events) + 1)]
    return {
        "times_us": [times[0] if times else 0.0, *times],
        "allocated": allocated_after,
        "reserved": reserved_after,
        "timed": timed,
        "events": len(events),
    }


def summarize_cuda_snapshot(
    snapshot: dict[str, Any], meta: dict[str, Any] | None = None, source: str = ""
) -> dict[str, Any]:
    """Peak memory of a CUDA snapshot, split with the tensor sizes measured during recording (`meta`).

    The snapshot alone cannot tell parameters from activations; `meta["measured"]` supplies parameter,
    gradient and optimizer-state bytes summed over real tensors, and activations plus everything else are
    the peak minus those. Without `meta` only totals are reported.
    """
    meta = meta or {}
    device_index = _cuda_device_index(snapshot, meta)
    timeline = cuda_memory_timeline(snapshot, device_index)
    allocated = timeline["allocated"]
    peak_index = max(range(len(allocated)), key=allocated.__getitem__)
    peak = allocated[peak_index]
    measured = meta.get("measured") or {}
    breakdown: dict[str, int | None] = {g: measured.get(g) for g in ("parameters", "gradients", "optimizer_state")}
    known = [v for v in breakdown.values() if v is not None]
    breakdown["activations_and_other"] = peak - sum(known) if len(known) == 3 else None

    notes = [
        "Peak = the most bytes the caching allocator had handed out to tensors at any moment, replayed from "
        "its alloc/free_completed trace backwards from the final state in the snapshot (block sizes, i.e. "
        "after the allocator's rounding).",
        f"Reserved by the allocator (cudaMalloc'd segments) peaked at {format_bytes(max(timeline['reserved']))}.",
    ]
    if known:
        notes.append(
            "Parameters and optimizer state were summed over the distinct tensor storages on the device at the "
            f"stop point; gradients over p.grad {measured.get('gradients_at', 'when measured')}. "
            "'activations_and_other' = peak - parameters - gradients - optimizer state: activations, "
            "temporaries, buffers, allocator rounding. The measured sizes are not taken at the instant of the "
            "peak, so that split is exact only if they were the same then."
        )
    else:
        notes.append(f"No measured category sizes ({snapshot_meta_path(source or SNAPSHOT_PICKLE).name} missing).")
    if meta.get("allocator_peak_allocated_bytes") is not None:
        notes.append(
            "The allocator's own counters since recording started: max allocated "
            f"{format_bytes(meta['allocator_peak_allocated_bytes'])}, max reserved "
            f"{format_bytes(meta.get('allocator_peak_reserved_bytes'))}."
        )
    if meta.get("max_entries") is not None and timeline["events"] >= meta["max_entries"]:
        notes.append(
            f"The trace holds max_entries={meta['max_entries']} events: older history was overwritten, so an "
            "earlier peak may be missing (raise profile_memory_max_entries)."
        )
    if min(allocated) < 0:
        notes.append("The replay went below zero bytes: the trace is inconsistent with the final state.")

    return {
        "format": SUMMARY_FORMAT,
        "method": CUDA_METHOD,
        "device": f"cuda:{device_index}",
        "source": Path(source).name if source else "",
        "stop_reason": meta.get("stop_reason"),
        "peak": {
            "total_bytes": peak,
            "time_ms": (timeline["times_us"][peak_index] - timeline["times_us"][0]) / 1000
            if timeline["timed"]
            else None,
            "breakdown": breakdown,
        },
        "reserved_peak_bytes": max(timeline["reserved"]),
        "trace_events": timeline["events"],
        "measured": measured or None,
        "notes": notes,
    }


def group_categories(by_category: dict[str, int]) -> dict[str, int]:
    """Sum bytes per torch.profiler category (lower-cased names) into the summary groups."""
    groups = dict.fromkeys(GROUPS, 0)
    for name, value in by_category.items():
        groups[_GROUP_OF_CATEGORY.get(name, "other")] += value
    return groups


def _grouped(names: Sequence[str], row: Sequence[int]) -> dict[str, int]:
    """Sum one timeline row of profiler categories into the summary groups."""
    return group_categories(dict(zip(names, row)))


def summarize_cpu_timeline(timeline: dict[str, Any], source: str = "") -> dict[str, Any]:
    """Peak memory of a CPU profiler timeline, by the profiler's categories and by summary group."""
    if timeline.get("format") != CPU_TIMELINE_FORMAT:
        raise ValueError(f"not a CPU memory timeline written by this package (format {timeline.get('format')!r})")
    names = timeline["categories"]
    rows = timeline["bytes"]
    if not rows:
        raise ValueError("the CPU memory timeline is empty: nothing was allocated while recording")
    times = timeline["times_us"]
    totals = [sum(row) for row in rows]
    peak_index = max(range(len(totals)), key=totals.__getitem__)
    meta = timeline.get("meta") or {}
    measured = meta.get("measured") or {}
    notes = [
        "Categories are torch.profiler's (torch.profiler._memory_profiler), inferred from the recorded op graph; "
        "'other' = input + temporary + autograd_detail + unknown. Only tensor memory from PyTorch's CPU "
        "allocator is counted; tensors that existed before recording started appear at its first timestamp.",
    ]
    if measured:
        notes.append(
            "'measured' sums real tensors (distinct storages) at the stop point, gradients "
            f"{measured.get('gradients_at', 'when measured')}; it cross-checks the profiler's categories."
        )
    peak_breakdown = _grouped(names, rows[peak_index])
    for group in ("parameters", "optimizer_state"):
        excess = peak_breakdown[group] - measured.get(group, peak_breakdown[group])
        if excess > 0:
            notes.append(
                f"At the peak the profiler labels {format_bytes(excess)} more as {group} than the tensors measured: "
                "temporaries that flow into parameters or optimizer state (e.g. inside optimizer.step) get that label."
            )
    return {
        "format": SUMMARY_FORMAT,
        "method": CPU_METHOD,
        "device": timeline.get("device", "cpu"),
        "source": Path(source).name if source else "",
        "stop_reason": meta.get("stop_reason"),
        "peak": {
            "total_bytes": totals[peak_index],
            "time_ms": (times[peak_index] - times[0]) / 1000,
            "breakdown": peak_breakdown,
            "by_profiler_category": dict(zip(names, rows[peak_index])),
        },
        "at_stop": {"total_bytes": totals[-1], "breakdown": _grouped(names, rows[-1])},
        "timeline_points": len(rows),
        "measured": measured or None,
        "notes": notes,
    }


def render_summary_markdown(summary: dict[str, Any]) -> str:
    """The summary as a short Markdown document: what was measured, the peak and its breakdown, notes, files."""
    peak = summary["peak"]
    lines = [
        "# Memory summary",
        "",
        f"- **What was measured:** {summary['method']} on `{summary['device']}`",
        f"- **Recording stopped:** {summary.get('stop_reason') or 'unknown'}",
        f"- **Source:** `{summary['source']}`" if summary.get("source") else "- **Source:** (in memory)",
        f"- **Peak total:** {format_bytes(peak['total_bytes'])} ({peak['total_bytes']} bytes)"
        + (f" at {peak['time_ms']:.1f} ms after recording started" if peak.get("time_ms") is not None else ""),
        "",
        "## Breakdown at the peak",
        "",
        "| category | bytes | size |",
        "|---|---:|---:|",
    ]
    lines += [f"| {k} | {v if v is not None else 'n/a'} | {format_bytes(v)} |" for k, v in peak["breakdown"].items()]
    if "by_profiler_category" in peak:
        lines += ["", "torch.profiler categories at the peak:", "", "| profiler category | bytes |", "|---|---:|"]
        lines += [f"| {k} | {v} |" for k, v in peak["by_profiler_category"].items()]
    if summary.get("measured") and summary["method"] == CPU_METHOD:  # on CUDA the breakdown already is these
        lines += ["", "## Measured from the tensors themselves", "", "| what | bytes | size |", "|---|---:|---:|"]
        lines += [
            f"| {k} | {v} | {format_bytes(v)} |" for k, v in summary["measured"].items() if not isinstance(v, str)
        ]
    lines += ["", "## Notes", ""] + [f"- {note}" for note in summary["notes"]]
    if summary.get("files"):
        lines += ["", "## Files", ""] + [f"- `{name}`" for name in summary["files"]]
    return "\n".join(lines) + "\n"


def write_summary(summary: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write `memory_summary.md` and `memory_summary.json` into `out_dir`."""
    out_dir = Path(out_dir)
    md_path, json_path = out_dir / SUMMARY_MD, out_dir / SUMMARY_JSON
    md_path.write_text(render_summary_markdown(summary), encoding="utf-8")
    json_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return [md_path, json_path]


def _new_figure() -> Any:
    """A matplotlib figure drawn with Agg, without pyplot, so no global backend is touched."""
    from matplotlib.figure import Figure

    return Figure(figsize=(12, 6), dpi=100, layout="constrained")


def plot_cpu_timeline(timeline: dict[str, Any], summary: dict[str, Any], path: Path) -> Path:
    """Stacked-area PNG of the CPU timeline by profiler category (MiB over ms)."""
    names = timeline["categories"]
    t0 = timeline["times_us"][0]
    times_ms = [(t - t0) / 1000 for t in timeline["times_us"]]
    columns = [[row[i] / 2**20 for row in timeline["bytes"]] for i in range(len(names))]
    fig = _new_figure()
    ax = fig.subplots()
    ax.stackplot(
        times_ms,
        columns,
        labels=names,
        colors=[_CATEGORY_COLORS.get(n, "grey") for n in names],
        step="post",
        linewidth=0,
    )
    ax.axvline(summary["peak"]["time_ms"], color="black", linestyle=":", linewidth=1, label="peak")
    ax.set_xlabel("time since recording started (ms)")
    ax.set_ylabel("memory (MiB)")
    ax.set_title(f"{CPU_METHOD}: peak {format_bytes(summary['peak']['total_bytes'])}")
    ax.legend(loc="upper left", fontsize="small")
    fig.savefig(path, format="png")
    return path


def plot_cuda_timeline(timeline: dict[str, Any], summary: dict[str, Any], path: Path) -> Path:
    """PNG of allocated and reserved bytes over time, with the measured categories as reference levels."""
    t0 = timeline["times_us"][0]
    scale = 1000 if timeline["timed"] else 1
    xs = [(t - t0) / scale for t in timeline["times_us"]]
    fig = _new_figure()
    ax = fig.subplots()
    ax.step(xs, [b / 2**30 for b in timeline["reserved"]], where="post", color="grey", label="reserved")
    ax.step(xs, [b / 2**30 for b in timeline["allocated"]], where="post", color="tab:blue", label="allocated")
    # Cumulative reference levels: parameters, then + optimizer state, then + gradients.
    level, prefix = 0, ""
    for group, color in (("parameters", "darkgreen"), ("optimizer_state", "goldenrod"), ("gradients", "mediumblue")):
        value = summary["peak"]["breakdown"].get(group)
        if value is not None:
            level += value
            ax.axhline(level / 2**30, color=color, linestyle="--", linewidth=1, label=prefix + group.replace("_", " "))
            prefix = "+ "
    ax.set_xlabel("time since recording started (ms)" if timeline["timed"] else "allocator event")
    ax.set_ylabel("memory (GiB)")
    ax.set_title(f"{CUDA_METHOD} ({summary['device']}): peak {format_bytes(summary['peak']['total_bytes'])}")
    ax.legend(loc="upper left", fontsize="small")
    fig.savefig(path, format="png")
    return path


def write_viewer_html(snapshot: dict[str, Any], path: str | Path) -> list[str]:
    """Write torch's interactive memory viewer (`trace_plot`) for a snapshot; return the URLs it loads.

    The page embeds the whole snapshot but imports its JavaScript (MemoryViz.js) from the web when opened.
    """
    from torch.cuda._memory_viz import trace_plot

    html = trace_plot(snapshot)
    Path(path).write_text(html, encoding="utf-8")
    return re.findall(r"""https?://[^\s"'<>]+\.js""", html)


def _try(what: str, fn: Any, *args: Any) -> Any:
    """Run a rendering step; on failure log a warning and return None, as rendering must not stop training."""
    try:
        return fn(*args)
    except Exception as exc:  # any rendering failure is reported, never raised
        logger.warning("Could not write the memory %s: %s: %s", what, type(exc).__name__, exc)
        return None


def write_report(source: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Summarize a saved recording into `out_dir` (default: next to it); return the files written by kind.

    `source` is a CUDA snapshot pickle (its `<stem>_meta.json` sidecar is read when present) or a
    `memory_timeline_cpu.json`. The PNG and HTML are best effort (a warning on failure); loading and
    summarizing errors are raised.
    """
    source = Path(source)
    out_dir = Path(out_dir) if out_dir is not None else source.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    if source.suffix == ".json":
        timeline = json.loads(source.read_text(encoding="utf-8"))
        summary = summarize_cpu_timeline(timeline, source=str(source))
        png = _try("timeline PNG", plot_cpu_timeline, timeline, summary, out_dir / TIMELINE_PNG)
    else:
        with open(source, "rb") as f:
            snapshot = pickle.load(f)
        meta_path = snapshot_meta_path(source)
        meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.exists() else None
        summary = summarize_cuda_snapshot(snapshot, meta, source=str(source))
        timeline = cuda_memory_timeline(snapshot, _cuda_device_index(snapshot, meta))
        png = _try("timeline PNG", plot_cuda_timeline, timeline, summary, out_dir / TIMELINE_PNG)
        urls = _try("HTML viewer", write_viewer_html, snapshot, out_dir / VIEWER_HTML)
        if urls is not None:
            written["html"] = out_dir / VIEWER_HTML
            summary["notes"].append(
                f"{VIEWER_HTML} embeds the snapshot but loads "
                + (", ".join(urls) if urls else "its viewer script")
                + " from the internet when opened (offline it shows nothing; the pickle also opens at "
                "https://pytorch.org/memory_viz)."
            )
    if png is not None:
        written["png"] = png
    summary["files"] = sorted(p.name for p in [source, *written.values()]) + [SUMMARY_MD, SUMMARY_JSON]
    written["summary_md"], written["summary_json"] = write_summary(summary, out_dir)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: `mfsgd-memory-report <memory_snapshot.pickle | memory_timeline_cpu.json> [--out DIR]`."""
    parser = argparse.ArgumentParser(
        prog="mfsgd-memory-report",
        description="Regenerate the memory summary (Markdown + JSON), the PNG timeline and, for CUDA snapshots, "
        "the HTML viewer from a saved recording.",
    )
    parser.add_argument(
        "source",
        type=Path,
        help="memory_snapshot.pickle (CUDA; unpickling runs code, so only open your own) or memory_timeline_cpu.json",
    )
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: next to the source)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.source.is_file():
        parser.error(f"no such file: {args.source}")
    written = write_report(args.source, args.out)
    for kind, path in written.items():
        logger.info("%s: %s", kind, path)
    return 0
