"""Counting Triton's cache lookups during the GPU lease (``benchmarks/gpu_lease.sh``).

Triton looks a kernel up in its on-disk cache (``TRITON_CACHE_DIR``) before it compiles one: a hit loads
the binary, a miss compiles it. With ``TRITON_CACHE_MANAGER=benchmarks.lease_cache:CountingCacheManager``
and ``CMD_LEASE_CACHE_LOG=FILE`` every such lookup of every process (pytest-xdist workers included)
appends one line to FILE::

    <stage>\\t<hit|miss>\\t<kernel name>\\t<cache entry>

where ``<stage>`` is ``$CMD_LEASE_STAGE``. So the lease's summary can say whether our kernels compiled on
the GPU or came from the cache filled on a CPU machine (``python -m cmd_kernels.aot --fill-cache``). Lookups
only happen on a process's first launch of a kernel variant (Triton keeps loaded kernels in memory), and
never in the interpreter (``TRITON_INTERPRET=1`` compiles nothing).

Only Triton is imported here: Triton itself imports this module in every process that compiles.
"""

import os

from triton.runtime.cache import FileCacheManager

LOG_ENV = "CMD_LEASE_CACHE_LOG"
STAGE_ENV = "CMD_LEASE_STAGE"
# Triton stores a kernel's metadata as "<kernel name>.json" in its group; the group index is "__grp__" + that.
_META_SUFFIX = ".json"


class CountingCacheManager(FileCacheManager):
    """Triton's own file cache, which also logs each kernel lookup (hit or miss) to ``$CMD_LEASE_CACHE_LOG``."""

    def get_group(self, filename):
        group = super().get_group(filename)
        path = os.environ.get(LOG_ENV)
        if path and filename.endswith(_META_SUFFIX):
            hit = bool(group) and filename in group  # what triton.compile tests before it skips compiling
            line = "\t".join((os.environ.get(STAGE_ENV, "-"), "hit" if hit else "miss",
                              filename[:-len(_META_SUFFIX)], str(self.key))) + "\n"
            # One short O_APPEND write per line: lines of concurrent processes do not interleave.
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
        return group
