"""How much memory this machine can still give: what a command checks before it allocates at a size the user
chose (a grid, a cache), so a request that cannot fit ends with one line instead of an allocator's traceback
or the kernel's OOM killer."""

from __future__ import annotations

import os


def available_memory() -> int:
    """Bytes of host memory available without swapping: the kernel's MemAvailable (free pages plus the caches it
    can drop), or the free pages where there is no /proc/meminfo."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
