"""`vlmtune demo`: the whole workflow on synthetic scenes and a tiny model, on a CPU."""
