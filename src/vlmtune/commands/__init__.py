"""The top floor: one module per `vlmtune <command>`, each `main(argv) -> int` (cli.py's COMMANDS table points here).

A command parses its arguments — flags derived from typed dataclass fields by `options.py`, so a flag and a YAML
key share one name and one help text — and calls the library below. Nothing in the library imports a command
(tests/test_layers.py checks the floors).
"""
