"""pyarrow's allocator in a process that reads batches all its life (``dlrm-train``).

pyarrow allocates with mimalloc, which hands memory freed back to the kernel soon after; the next row
group's buffers are then new pages the kernel zeroes as they are first written (a multi-hot row group of
131,072 rows: ~0.1-0.2 s of kernel time each, against ~0.01 s when the memory is kept). mimalloc reads
its options when pyarrow loads, so the setting is made before that, and only for training: the process
then holds what its largest row groups took, which a bounded ``dlrm-preprocess`` must not.
"""

from __future__ import annotations

import os


def keep_decoded_memory() -> bool:
    """Keep freed pyarrow memory for its next use; before pyarrow is imported (a user's setting stays).
    Whether the setting was made now (False: the environment already had one)."""
    if "MIMALLOC_PURGE_DELAY" in os.environ:
        return False
    os.environ["MIMALLOC_PURGE_DELAY"] = "-1"
    return True
