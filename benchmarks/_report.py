"""Shared by the benchmark scripts: the machine's matmul rate, an earlier commit checked out beside this one, and
writing a section of BENCHMARKS.md."""

from __future__ import annotations

import contextlib
import platform
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "BENCHMARKS.md"


def matmul_gflops(size: int = 1024, repeats: int = 20) -> float:
    """Measured fp32 matmul rate of this machine with torch's default thread count (best of 3)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9)
    return best


def latency_and_throughput(logits, texts: list[str], n: int, batch_texts: int, warmup: int = 32,
                           call_size: int | None = None) -> tuple[float, float]:
    """p50 latency (ms) of ``logits([text])`` over ``texts[:n]``, and sentences/s on ``texts[:batch_texts]``.

    ``logits`` maps a list of texts to outputs and batches them itself (by 32 in the benchmarks). Throughput
    is of one call on all ``batch_texts`` texts (which the backend sorts by length before batching), or, with
    ``call_size``, of successive calls of that many texts in their given order.
    """
    import statistics

    logits(texts[:warmup])
    latencies = []
    for text in texts[:n]:
        start = time.perf_counter()
        logits([text])
        latencies.append(time.perf_counter() - start)
    size = call_size or batch_texts
    start = time.perf_counter()
    for i in range(0, batch_texts, size):
        logits(texts[i:min(i + size, batch_texts)])
    return 1000 * statistics.median(latencies), batch_texts / (time.perf_counter() - start)


def shown(path: str | Path) -> str:
    """A path as a report prints it: relative to the project where it lies inside it (a report names no machine)."""
    path = Path(path).absolute()
    root = BENCHMARKS.parent
    return str(path.relative_to(root)) if path.is_relative_to(root) else path.name


def machine() -> str:
    import os

    cpu = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    try:
        import torch
    except ImportError:  # the service's environment (the image's) has no torch
        return f"{cpu}, no torch"
    return f"{cpu}, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def write_section(name: str, command: str, body: str, path: Path = BENCHMARKS) -> None:
    """Replace (or append) the section ``name`` of BENCHMARKS.md (or of ``path``)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    section = f"{begin}\n_Command:_ `{command}`  \n_Date:_ {time.strftime('%Y-%m-%d')}  \n_Machine:_ {machine()}\n\n{body.strip()}\n{end}"
    title = "Benchmarks" if path == BENCHMARKS else path.stem.capitalize()
    text = path.read_text() if path.exists() else f"# {title}\n\nEach section is written by the script named in its command; rerun it to refresh.\n"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + f"\n\n{section}\n"
    path.write_text(text if text.endswith("\n") else text + "\n")


@contextlib.contextmanager
def checkouts(before: str | None, scratch: Path) -> Iterator[dict[str, Path]]:
    """The service's code by label: this checkout, and the commit ``before`` in a temporary worktree."""
    if before is None:
        yield {"this checkout": ROOT}
        return
    rev = subprocess.run(["git", "rev-parse", "--short", before], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    tree = scratch / "before"
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), rev], cwd=ROOT, check=True, capture_output=True)
    try:
        yield {"this checkout": ROOT, f"at {rev} (before)": tree}
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)
