"""Training: `vlmtune train CONFIG.yaml` — the loop (loop.py), its data order, checkpoints and logs."""
