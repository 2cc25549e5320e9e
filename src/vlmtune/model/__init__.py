"""Models: loading (local dir or hub id), adapters (LoRA / freeze / full), tiny test models, export."""
