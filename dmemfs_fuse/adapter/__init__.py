"""The FUSE adapter: pyfuse3 operations that translate requests into calls on the plain
layers, the connection's negotiation, the caller and the data path record."""
