"""Timing, peak-memory and reporting shared by the benchmark scripts.

Timing: every case runs once per repetition, cases interleaved (the starting case rotates from
one repetition to the next), so that load from other processes and thermal drift hit all cases
alike; the tables report medians and ratios of medians measured in the same process.

Peak memory: the largest amount of tensor memory alive during one call, minus what was alive
before it (parameters and inputs are excluded; gradients, saved activations and temporaries
are counted). On CUDA this is ``torch.cuda.max_memory_allocated``. On CPU, where torch keeps no
allocator statistics, it is the running sum of the allocation and free events (signed sizes,
in time order) that the torch profiler records with ``profile_memory=True``, the data behind
``torch.profiler``'s memory timeline.
"""

import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
import transformers
from torch._C._profiler import _EventType

import hf_moe


def resolve_device_args(parser, args) -> None:
    """Default dtype per device (bf16 on CUDA, fp32 on CPU); ``--cpu-time`` is CPU-only, one thread."""
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    if args.cpu_time:
        if args.device != "cpu":
            parser.error(f"--cpu-time measures CPU threads; it needs --device cpu, got --device {args.device}")
        args.threads = 1


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    cases: dict[str, Callable[[], object]],
    reps: int,
    warmup: int,
    device: torch.device,
    prepare: dict[str, Callable[[], object]] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds of each run of each case, cases interleaved within every repetition.

    ``prepare[name]`` (optional) runs untimed before each timed run of ``name`` (e.g. clearing
    gradients). ``clock`` is wall time by default; ``time.thread_time`` with one torch thread
    measures the CPU time of the only compute thread, which other processes cannot inflate by
    taking its core away.
    """
    prepare = prepare or {}
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            prepare.get(name, lambda: None)()
            cases[name]()
    seconds = {name: [] for name in names}
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            prepare.get(name, lambda: None)()
            synchronize(device)
            start = clock()
            cases[name]()
            synchronize(device)
            seconds[name].append(clock() - start)
    return seconds


def median(values: list[float]) -> float:
    return statistics.median(values)


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak tensor memory allocated during ``fn()`` above what was allocated before it."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    # The profiler records every CPU allocation and free (profile_memory=True) as an event with
    # a signed size and a timestamp; the running sum in time order is the live bytes added since
    # the call began.
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    changes, pending = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        event = pending.pop()
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            changes.append((event.start_time_ns, event.extra_fields.alloc_size))
        pending.extend(event.children)
    live = peak = 0
    for _, size in sorted(changes):
        live += size
        peak = max(peak, live)
    return peak


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_lines(device: torch.device) -> list[str]:
    """Machine, versions and date, printed above every table."""
    if device.type == "cuda":
        machine = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    else:
        machine = f"{cpu_name()}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads"
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return [
        f"date: {now}",
        f"machine: {machine}; {platform.system()} {platform.release()}; python {platform.python_version()}",
        f"torch {torch.__version__}, transformers {transformers.__version__}, hf_moe {hf_moe.__version__}",
        f"load average (1/5/15 min) when the report was printed: {load_average()}",
    ]


def load_average() -> str:
    """Other processes on the machine slow every case; a high load makes the ratios noisier."""
    try:
        return " / ".join(f"{value:.1f}" for value in os.getloadavg())
    except OSError:
        return "unknown"


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]

    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])
