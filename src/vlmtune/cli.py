"""`vlmtune <command> ...`: dispatch only.

Each command lives in the module of its pipeline stage and exposes ``main(argv) -> int``; this file
maps names to modules, imports only the one that runs (so `vlmtune eval` never imports torch), and
turns :class:`VlmtuneError` into a one-line message with exit code 1.
"""

from __future__ import annotations

import importlib
import sys

from vlmtune.errors import VlmtuneError

# command -> (module, one-line help). Modules are imported lazily. Commands join this table when they land.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("vlmtune.train.command", "fine-tune a model from a LLaMA-Factory-style YAML"),
    "predict": ("vlmtune.infer.command", "predict a dataset with base model + adapter into a JSONL (label scores or text)"),
    "eval": ("vlmtune.evaluate.command", "metrics (accuracy, precision, recall, F1, AUC) of a predictions JSONL"),
    "report": ("vlmtune.evaluate.report_command", "self-contained HTML report of a predictions JSONL"),
    "sweep": ("vlmtune.evaluate.sweep_command", "evaluate the base model, every checkpoint-N and the final adapter of a run"),
    "data": ("vlmtune.data.command", "check datasets before training (`vlmtune data check`); the encoded-data stores (`vlmtune data cache`)"),
    "inspect": ("vlmtune.model.inspect", "print the trainable-parameter summary of a model + adapter set-up"),
    "tiny-model": ("vlmtune.model.tiny", "build a tiny random model of a supported family for tests and demos"),
    "webui": ("vlmtune.serve.webui", "a web page to try the model on single images (Gradio)"),
    "api": ("vlmtune.serve.api", "an OpenAI-compatible HTTP API: /v1/chat/completions with images, label scores"),
    "export": ("vlmtune.model.export", "merge a LoRA adapter into the base model and write a standard checkpoint"),
    "synth": ("vlmtune.synth.command", "generate synthetic compliance scenes with labels"),
    "demo": ("vlmtune.demo.command", "the whole workflow on synthetic data and a tiny model, on CPU"),
}


def usage() -> str:
    lines = ["usage: vlmtune <command> [args]", "", "commands:"]
    width = max(len(name) for name in COMMANDS)
    for name, (_, help_text) in COMMANDS.items():
        lines.append(f"  {name.ljust(width)}  {help_text}")
    lines.append("")
    lines.append("`vlmtune <command> --help` for a command's options.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from vlmtune import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command '{name}'\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[name][0])
    except ModuleNotFoundError as exc:
        if exc.name and not exc.name.startswith("vlmtune"):
            print(f"error: `vlmtune {name}` needs the package '{exc.name}', which is not installed "
                  f"(see the README's optional extras)", file=sys.stderr)
            return 1
        raise
    try:
        return int(module.main(rest) or 0)
    except VlmtuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
