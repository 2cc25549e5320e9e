"""Evaluate predictions: metrics (`vlmtune eval`), the HTML report (`vlmtune report`), the checkpoint sweep
(`vlmtune sweep`).

metrics, table and report import no torch, so `vlmtune eval` and `vlmtune report` start in a fraction of a second.
"""
