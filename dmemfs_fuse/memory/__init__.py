"""The memory: the region (or the pools' shmem) taken at start-up, huge pages, NUMA nodes, the
FUSE bdi.  The lowest layer: it imports nothing of the package but the foundations."""
