"""Evaluate predictions: metrics (`vlmtune eval`), the HTML report (`vlmtune report`).

Nothing here imports torch, so these commands start in a fraction of a second.
"""
