"""Datasets: registry (dataset_info.json) → records → Conversations → checks → split → encoding."""
