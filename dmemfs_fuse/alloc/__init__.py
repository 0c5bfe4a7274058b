"""Allocation: the bitmap, a pool of dpages, placement policies, the set of pools, and
zeroing freed dpages.  Imports only the memory layer below it."""
