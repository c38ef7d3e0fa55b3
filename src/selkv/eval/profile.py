"""``--profile DIR`` for any task: a torch.profiler Chrome trace and the top operators by time and memory.

Writes ``DIR/trace.json`` (open in chrome://tracing or https://ui.perfetto.dev) and
``DIR/top_operators.md``. Profiling a whole long run makes a very large trace: profile a small one
(``--limit``, ``--max-tokens``, few caches).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

ROW_LIMIT = 25


@contextlib.contextmanager
def profiled(profile_dir: str | Path):
    from torch.profiler import ProfilerActivity, profile

    out = Path(profile_dir)
    out.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, profile_memory=True, record_shapes=False) as prof:
        yield prof
    prof.export_chrome_trace(str(out / "trace.json"))
    write_tables(prof, out / "top_operators.md", cuda=torch.cuda.is_available())


def write_tables(prof, path: Path, cuda: bool = False) -> None:
    averages = prof.key_averages()
    time_key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    memory_key = "self_cuda_memory_usage" if cuda else "self_cpu_memory_usage"
    text = [
        "# Top operators",
        "",
        f"## By self time ({time_key})",
        "",
        "```",
        averages.table(sort_by=time_key, row_limit=ROW_LIMIT),
        "```",
        "",
        f"## By memory ({memory_key})",
        "",
        "```",
        averages.table(sort_by=memory_key, row_limit=ROW_LIMIT),
        "```",
        "",
    ]
    path.write_text("\n".join(text), encoding="utf-8")
    print(f"profile: {path.parent / 'trace.json'} and {path}")
