"""Capture: router discovery, readers and the hooks that record routing."""
