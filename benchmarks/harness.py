"""What the benchmarks share: device timing, the machine a number came from, and the result files they write.

Every benchmark runs from the repository root as ``python -m benchmarks.NAME``; its results go under ``REPO``
(``outputs/`` for a run's files, ``results/`` for the committed tables).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[1]


def sync(device: torch.device) -> None:
    """Wait for `device`'s queued work (CUDA runs asynchronously; the CPU has nothing to wait for)."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall-clock seconds of `fn()`, with `device` synchronised before and after so its kernels are counted."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def machine_description() -> dict[str, Any]:
    """The machine and software the numbers came from."""
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return {
        "device": device,
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def save_lr_plot(fig: Any, ax: Any, path: Path, ylabel: str, title: str) -> Path:
    """Finish a plot over learning rates (log x axis, labels, legend) and save it as a PNG at `path`."""
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.savefig(path, format="png")
    return path


def save_results(
    result: dict[str, Any],
    stem: str,
    out_dir: Path,
    results_dir: str | Path | None,
    render_markdown: Callable[[dict[str, Any]], str],
    plot: Callable[[dict[str, Any], Path], Any],
) -> list[Path]:
    """Write `<stem>.md`, `.json` and `.png` into `out_dir`, copy them into `results_dir` if given, print the table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js, png = (out_dir / f"{stem}{ext}" for ext in (".md", ".json", ".png"))
    md.write_text(render_markdown(result))
    js.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, png)
    files = [md, js, png]
    if results_dir:
        Path(results_dir).mkdir(parents=True, exist_ok=True)
        for path in files:
            shutil.copy(path, Path(results_dir) / path.name)
    print(render_markdown(result))
    return files
