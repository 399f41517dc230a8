"""The host a figure was measured on: its CPU model, how many CPUs this process may use, and
its peak host memory, recorded beside timings (CPU timings compare only on one machine)."""
import os
import platform
import resource


def cpu_model() -> str:
    """The CPU's model name as lscpu shows it (the processor string where /proc has none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity, not the machine's total)."""
    return len(os.sched_getaffinity(0))


def host_peak_bytes() -> int:
    """This process's largest resident set so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
