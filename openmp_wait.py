"""
How idle OpenMP threads wait, chosen before torch starts OpenMP (train.py calls choose() before importing torch).
libgomp's threads spin (~300000 times) before they sleep: fastest on a quiet CPU (1.25x at the quick start), but
on a busy one they take the cores that working threads need (1.7x slower there), so they spin only briefly when
other processes already keep a CPU busy. A GOMP_SPINCOUNT of the user's own wins.
"""
import os
import time


def cpus_busy_elsewhere(seconds=0.1):
    """How many CPUs other processes keep busy, measured over `seconds` from Linux's /proc/stat (0 elsewhere)."""
    def busy_and_total():
        with open('/proc/stat') as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        return sum(ticks) - ticks[3] - ticks[4], sum(ticks)
    try:
        (busy0, total0), _, (busy1, total1) = busy_and_total(), time.sleep(seconds), busy_and_total()
    except (OSError, ValueError):
        return 0.0
    return (busy1 - busy0) / max(1, total1 - total0) * os.cpu_count()


def choose():
    if 'GOMP_SPINCOUNT' not in os.environ and cpus_busy_elsewhere() >= 0.5:
        os.environ['GOMP_SPINCOUNT'] = '1000'
        print("other processes keep a CPU busy: OpenMP threads spin only briefly before they sleep (GOMP_SPINCOUNT=1000)")
