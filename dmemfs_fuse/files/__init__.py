"""Files: the inode table, extents, the stores of both data paths and memory errors.
Imports allocation and memory."""
