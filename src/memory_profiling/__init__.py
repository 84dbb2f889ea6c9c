"""Memory profiling for training runs, in one place: record, report, measure.

Used by the LLaMA-Factory callback (``llamafactory_mfsgd.memory_snapshot``, the ``profile_memory_*`` keys), the
NanoGPT trainer (``--mem-prof``), the benchmarks and the tests. The optimizer package ``mofasgd`` does not depend
on it (it stays torch-core; ``MoFaSGD.state_bytes`` counts its own state).

- :class:`MemoryRecorder`: CUDA allocator history, or torch.profiler's CPU memory timeline, saved to a file.
- :func:`write_report`: summary (Markdown + JSON, peak split into parameters / gradients / optimizer state /
  activations / other), PNG timeline and, for CUDA, torch's HTML viewer; also the ``mfsgd-memory-report``
  command (:func:`memory_profiling.report.main`).
- :func:`transient_peak_bytes`, :func:`storage_bytes`, :func:`peak_rss_bytes`: point measurements.
"""

from .measure import peak_rss_bytes, storage_bytes, transient_peak_bytes
from .recorder import MemoryRecorder
from .report import GROUPS, format_bytes, group_categories, write_report

__all__ = [
    "GROUPS",
    "MemoryRecorder",
    "format_bytes",
    "group_categories",
    "peak_rss_bytes",
    "storage_bytes",
    "transient_peak_bytes",
    "write_report",
]
