"""Peak resident memory of this process, resettable: the benches measure one operation's extra peak.

VmHWM (the high-water mark of VmRSS) is reset by writing 5 to /proc/self/clear_refs (Linux >= 4.0).
Run with MALLOC_MMAP_THRESHOLD_=65536 so glibc returns every freed block above 64 KiB to the OS and
a freed buffer cannot hide a later one.
"""

from __future__ import annotations

import re


def rss_mb(field: str = "VmRSS") -> float:
    """VmRSS (now) or VmHWM (peak since the last reset), in MiB."""
    with open("/proc/self/status") as handle:
        return int(re.search(rf"{field}:\s+(\d+)", handle.read()).group(1)) / 1024


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
