"""Metadata persistence: the format, the journal that writes it, recovery and where the
metadata lives.  Imports files and the layers below."""
