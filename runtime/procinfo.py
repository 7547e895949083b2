"""Process memory facts for benchmarks and tests."""

from __future__ import annotations

import resource


def peak_rss() -> int:
    """Peak resident set size of this process in bytes since its last exec.

    Reads VmHWM: `ru_maxrss` survives execve on Linux, so a child started from a big parent
    would report the parent's peak instead of its own."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
