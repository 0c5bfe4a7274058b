"""dmemfs-fuse: reserved host memory served as files, the dmemfs model through FUSE."""

__version__ = "0.1.0"
