"""How busy the machine was while a figure was measured, so that figures from a loaded machine are not taken for
quiet ones.

Timings on a shared machine are not comparable: load slows the MoE layer's matmuls more than the search, which
flatters the ratios. Every speed script (perf_*.py) records, beside each figure, `os.getloadavg()` before and
after it and the CPU the *other* processes used meanwhile (from /proc/stat, minus this process's own CPU time):
the load average also counts the script's own threads and lags by a minute, the other processes' share does
neither. A script first samples the machine for a few seconds and refuses to start when others are busy, unless
`--allow-load` is given; a figure measured while others were busy is flagged and warned about.

    with Load() as load:
        ...measure...
    row.update(load.record)
"""

from __future__ import annotations

import os
import sys
import time

BUSY = 0.2  # cores used by other processes above which a figure counts as measured under load


def _busy_seconds() -> float | None:
    """CPU seconds all processes have spent busy since boot (Linux /proc/stat), None where unknown."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    """CPU seconds of this process and every descendant, live or reaped: a vLLM engine's core and worker processes
    are this measurement's own work, not other processes' load."""
    import psutil  # accelerate's dependency, so installed wherever the package is

    me = psutil.Process()
    t = me.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for child in me.children(recursive=True):
        try:
            c = child.cpu_times()
        except psutil.Error:  # it exited meanwhile
            continue
        total += c.user + c.system
    return total


class Load:
    """Context manager: `record` holds the load averages before/after and the other processes' cores meanwhile;
    a loaded figure is warned about on stderr (unless `warn` is false)."""

    def __init__(self, warn: bool = True):
        self.warn = warn

    def __enter__(self) -> "Load":
        self.before = os.getloadavg()
        self.busy, self.own, self.wall = _busy_seconds(), _own_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self.wall
        busy = _busy_seconds()
        others = None
        if busy is not None and self.busy is not None and wall > 0:
            others = max(0.0, (busy - self.busy) - (_own_seconds() - self.own)) / wall
        self.record = {"loadavg_before": [round(x, 2) for x in self.before],
                       "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                       "others_cores": None if others is None else round(others, 2),
                       "loaded": others is not None and others > BUSY}
        if self.record["loaded"] and self.warn:
            print(f"WARNING: other processes used {others:.2f} cores while this figure was measured "
                  f"(load average {self.record['loadavg_after'][0]}): it is NOT a quiet-machine figure",
                  file=sys.stderr, flush=True)


def require_quiet(allow_load: bool, seconds: float = 3.0) -> dict:
    """Sample the machine; refuse (SystemExit) when other processes keep it busy, unless `allow_load`."""
    with Load(warn=False) as load:
        time.sleep(seconds)
    busy = load.record["others_cores"]
    if busy is not None and busy > BUSY:
        message = (f"other processes are using {busy:.2f} cores (load average {load.record['loadavg_after'][0]}, "
                   f"{os.cpu_count()} CPUs): figures measured now are not comparable with a quiet machine's")
        if not allow_load:
            raise SystemExit(f"refusing to measure: {message}. Stop them, or pass --allow-load to measure anyway "
                             "(every figure is then flagged as loaded).")
        print(f"WARNING: {message}; measuring anyway (--allow-load)", file=sys.stderr, flush=True)
    return load.record
