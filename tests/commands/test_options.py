"""Help written once (house rule 7): every option of every command is a typed dataclass field — a key of the run
config (`config.py`) or a command's own settings — with the field's name as the flag and the field's help as its
help; older spellings still parse. In-process, no model."""

from __future__ import annotations

import argparse
import dataclasses
import importlib

import pytest

from vlmtune.cli import COMMANDS
from vlmtune.config import key_sections

# Each command module's dataclasses of own settings (the rest of its options are config keys).
OWN = {
    "predict": ("vlmtune.infer.predict.PredictArgs",),
    "eval": ("vlmtune.commands.eval.EvalArgs",),
    "report": ("vlmtune.commands.report.ReportArgs",),
    "sweep": ("vlmtune.commands.sweep.SweepArgs", "vlmtune.infer.predict.PredictArgs"),
    "data": ("vlmtune.commands.data.CacheArgs",),
    "inspect": (),
    "tiny-model": ("vlmtune.commands.tiny_model.TinyModelArgs",),
    "webui": ("vlmtune.commands.serving.ServerArgs", "vlmtune.commands.webui.PageArgs", "vlmtune.serve.common.Limits"),
    "api": ("vlmtune.commands.serving.ServerArgs", "vlmtune.commands.api.ApiArgs", "vlmtune.serve.common.Limits"),
    "export": ("vlmtune.commands.export.ExportRunArgs",),
    "synth": ("vlmtune.commands.synth.SynthArgs",),
    "demo": ("vlmtune.commands.demo.DemoArgs",),
}


def load(dotted: str):
    module, name = dotted.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def options(parser: argparse.ArgumentParser):
    """Every optional argument of the parser and of its sub-commands' parsers."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from options(sub)
        elif action.option_strings and action.dest != "help" and action.help != argparse.SUPPRESS:
            yield action


def field_helps(command: str) -> dict[str, str]:
    helps = {key: f.metadata["help"] for key, (_, f) in key_sections().items()}
    for dotted in OWN[command]:
        helps.update({f.name: f.metadata["help"] for f in dataclasses.fields(load(dotted))})
    return helps


@pytest.mark.parametrize("command", sorted(OWN))
def test_every_option_is_a_field_with_the_fields_help(command):
    parser = importlib.import_module(COMMANDS[command][0]).build_parser()
    helps = field_helps(command)
    found = list(options(parser))
    assert found, command
    for action in found:
        assert action.dest in helps, f"vlmtune {command} {action.option_strings}: not a typed field"
        assert action.help.replace("%%", "%").startswith(helps[action.dest]), (command, action.dest)


def test_every_command_is_covered():
    assert set(COMMANDS) - set(OWN) == {"train"}  # train takes a YAML and key=value only


def test_flags_parse_as_the_yaml_keys_and_old_spellings_still_work():
    from vlmtune.commands import predict, report

    cfg, pargs, given = predict.parse_args(["--model_name_or_path", "m", "--dataset", "d", "--bf16",
                                            "--enable_thinking", "false", "--backend", "vllm", "--labels", "a，b",
                                            "--top_k", "5", "--overwrite"])
    assert cfg.train.bf16 is True and cfg.data.enable_thinking is False and cfg.predict.infer_backend == "vllm"
    assert cfg.data.labels == ["a", "b"] and cfg.predict.top_k == 5 and pargs.overwrite is True
    assert {"bf16", "enable_thinking", "infer_backend", "labels", "top_k", "overwrite"} <= given
    args = report.build_parser().parse_args(["p.jsonl", "--run-dir", "r", "--max-gallery", "3", "--positive", "x"])
    assert (args.run_dir, args.max_gallery, args.positive_label) == ("r", "3", "x")


def test_a_flag_and_a_yaml_key_fail_with_the_same_one_line(tmp_path):
    from vlmtune.commands import predict
    from vlmtune.errors import VlmtuneError

    with pytest.raises(VlmtuneError, match="'max_new_tokens' must be an integer"):
        predict.parse_args(["--dataset", "d", "--max_new_tokens", "many"])
    config = tmp_path / "p.yaml"
    config.write_text("dataset: d\nmax_new_tokens: many\n", encoding="utf-8")
    with pytest.raises(VlmtuneError, match="'max_new_tokens' must be an integer"):
        predict.parse_args([str(config)])
