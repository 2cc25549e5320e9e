"""vlmtune: fine-tune vision-language models to judge images against rules."""

__version__ = "0.1.0"
