"""`vlmtune <command> ...`: dispatch only.

Each command is a module of `vlmtune.commands` (the top floor, above the library it calls) exposing
``main(argv) -> int``; this file maps names to modules, imports only the one that runs (so `vlmtune eval` never
imports torch), and turns :class:`VlmtuneError` into a one-line message with exit code 1.
"""

from __future__ import annotations

import importlib
import sys

from vlmtune.errors import VlmtuneError
from vlmtune.progress import quiet_library_bars

# command -> (module, one-line help). Modules are imported lazily. Commands join this table when they land.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("vlmtune.commands.train", "fine-tune a model from a LLaMA-Factory-style YAML (and predict: do_predict)"),
    "predict": ("vlmtune.commands.predict", "predict a dataset with base model + adapter into a JSONL (label scores or text)"),
    "eval": ("vlmtune.commands.eval", "metrics (accuracy, precision, recall, F1, AUC) of a predictions JSONL"),
    "report": ("vlmtune.commands.report", "self-contained HTML report of a predictions JSONL"),
    "sweep": ("vlmtune.commands.sweep", "evaluate the base model, every checkpoint-N and the final adapter of a run"),
    "data": ("vlmtune.commands.data", "check datasets before training (`vlmtune data check`); the encoded-data stores (`vlmtune data cache`)"),
    "inspect": ("vlmtune.commands.inspect", "print the trainable-parameter summary of a model + adapter set-up"),
    "tiny-model": ("vlmtune.commands.tiny_model", "build a tiny random model of a supported family for tests and demos"),
    "webui": ("vlmtune.commands.webui", "a web page to try the model on single images (Gradio)"),
    "api": ("vlmtune.commands.api", "an OpenAI-compatible HTTP API: /v1/chat/completions with images, label scores"),
    "export": ("vlmtune.commands.export", "merge a LoRA adapter into the base model (flags or LLaMA-Factory's export YAML)"),
    "synth": ("vlmtune.commands.synth", "generate synthetic compliance scenes with labels"),
    "demo": ("vlmtune.commands.demo", "the whole workflow on synthetic data and a tiny model, on CPU"),
}


def usage() -> str:
    lines = ["usage: vlmtune <command> [args]", "", "commands:"]
    width = max(len(name) for name in COMMANDS)
    for name, (_, help_text) in COMMANDS.items():
        lines.append(f"  {name.ljust(width)}  {help_text}")
    lines.append("")
    lines.append("`vlmtune <command> --help` for a command's options.")
    return "\n".join(lines)


def quiet_bitsandbytes_cpu_kernel_note() -> None:
    """bitsandbytes (imported by peft in every command that loads a model, once the `qlora` extra is installed)
    tries at import to fetch a CPU 4-bit matmul kernel from the kernels hub and warns when it cannot — on every
    machine with AVX512-BF16, GPU boxes included. vlmtune never needs that kernel for its work (its torch path
    computes the same), so the warning is dropped; bitsandbytes' other messages pass."""
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: "gemm_4bit_forward" not in record.getMessage())


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
    quiet_library_bars()  # before the command imports transformers: its bars read the switch at import
    quiet_bitsandbytes_cpu_kernel_note()
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
        # One line whatever the message quotes: a file or dataset name may itself hold a line break.
        print("error: " + " ".join(line.strip() for line in str(exc).splitlines() if line.strip()), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
