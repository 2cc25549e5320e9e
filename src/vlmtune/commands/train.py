"""`vlmtune train CONFIG.yaml [key=value ...]` (or `vlmtune train --key value ...`, as `llamafactory-cli train`)

Trains, and with `do_predict: true` then predicts eval_dataset into output_dir/generated_predictions.jsonl —
or, with do_predict and no do_train (or `do_train: false`), only predicts: LLaMA-Factory's predict YAML (see
`vlmtune/train/workflow.py`).

On a machine with several GPUs and no launcher around it, this starts torchrun itself with one process
per GPU, on a free port; also for DeepSpeed on one GPU (or a CPU) — see `vlmtune.launch`. `torchrun
--nproc_per_node N -m vlmtune train CONFIG.yaml` and the usual multi-node torchrun flags work as well. On
CPUs, torchrun with several processes uses the gloo backend.
"""

from __future__ import annotations

import argparse
import json
import os

from vlmtune import allocator
from vlmtune.commands.options import command_parser, type_members
from vlmtune.config import load_config, parse_override, read_yaml
from vlmtune.errors import VlmtuneError
from vlmtune.launch import relaunch_under_torchrun, torchrun_processes, visible_gpus


def main(argv: list[str]) -> int:
    parser = command_parser("train", __doc__)
    parser.add_argument("config", help="training YAML or JSON (LLaMA-Factory keys; see docs/config.md) — or, as "
                                       "`llamafactory-cli train` takes them, no file and every key as a flag: "
                                       "--key value, --key=value, --flag (true)")
    parser.add_argument("overrides", nargs="*", help="key=value settings that override the YAML")
    flags = argv[:1] and argv[0].startswith("--") and argv[0] != "--help"
    args = (argparse.Namespace(config=None, overrides=flags_as_overrides(argv)) if flags
            else parser.parse_args(argv))
    cfg = load_config(args.config, args.overrides)  # validate before launching anything
    quiet_waiting_threads()
    predict_only = cfg.train.do_predict and not cfg.train.do_train
    if predict_only:
        allocator.for_prediction()  # before torch allocates: see vlmtune/allocator.py
    else:
        allocator.for_training()
    vllm_alone = predict_only and cfg.predict.infer_backend == "vllm"  # vLLM spreads a model over GPUs itself
    processes = None if vllm_alone else torchrun_processes(bool(cfg.train.deepspeed) and not predict_only,
                                                          visible_gpus(), os.environ)
    if processes is not None:
        relaunch_under_torchrun("train", argv, processes)
    from vlmtune.train.workflow import run_sft

    explicit = set(read_yaml(args.config) if args.config else ()) | {parse_override(item)[0] for item in
                                                                     args.overrides}
    run_sft(cfg, explicit)
    return 0


def flags_as_overrides(argv: list[str]) -> list[str]:
    """`--key value`, `--key=value`, `--key a b` (a list key: "a,b", as vlmtune's list keys are written) and a bare
    `--flag` (true), as transformers' HfArgumentParser reads the flags of `llamafactory-cli train` without a YAML
    (LLaMA-Factory's web UI previews its runs so), → key=value overrides (an unknown key is then refused by name).
    As HfArgumentParser: a string key's value is the text typed (`--default_system "#1: ..."` is not YAML), a key
    that is not a true/false one needs a value, and only a list key takes several."""
    overrides, i = [], 0
    while i < len(argv):
        item = argv[i]
        if not item.startswith("--") or item == "--":
            raise VlmtuneError(f"command line: '{item}' is not a --key (give every setting as --key value, or a "
                               f"YAML first)")
        key, equals, value = item[2:].partition("=")
        values = [value] if equals else []
        while i + 1 < len(argv) and not _is_flag(argv[i + 1]):  # a list flag takes several: --report_to a b
            values.append(argv[i + 1])
            i += 1
        overrides.append(_flag_override(key, values))
        i += 1
    return overrides


def _is_flag(token: str) -> bool:
    """`--key`, or `-x` as argparse reads it (a negative number, `-1e-4`, is a value)."""
    if not token.startswith("-") or token == "-":
        return False
    try:
        float(token)
    except ValueError:
        return True
    return False


def _flag_override(key: str, values: list[str]) -> str:
    """One flag's values as a `key=value` override, refused in one line where HfArgumentParser refuses them."""
    kind = _key_kind(key)
    if not values:
        if kind in ("bool", "unknown"):
            return f"{key}=true"
        raise VlmtuneError(f"command line: --{key} needs a value")
    if not all(v.strip() for v in values):
        raise VlmtuneError(f"command line: --{key} is given an empty value (leave the flag out for the default)")
    if len(values) > 1 and kind not in ("list", "unknown"):
        raise VlmtuneError(f"command line: --{key} takes one value, got {len(values)}: {values!r}")
    if kind == "str":  # a JSON string is YAML that reads back as exactly this text
        return f"{key}={json.dumps(values[0], ensure_ascii=False)}"
    return f"{key}={','.join(values)}"


def _key_kind(key: str) -> str:
    """'list', 'str', 'bool', 'other' (numbers, mappings) or 'unknown' (a key vlmtune does not have: other_keys
    decides): a config key's type, as its flag's values are read."""
    import typing

    from vlmtune.config import SECTIONS, key_sections

    found = key_sections().get(key)
    if found is None:
        return "unknown"
    members = list(type_members(typing.get_type_hints(SECTIONS[found[0]])[key]))
    if any(typing.get_origin(m) is list for m in members):
        return "list"
    return "str" if members == [str] else "bool" if bool in members else "other"


def quiet_waiting_threads() -> None:
    """On a CPU already busy with other work, OpenMP threads that run out of work sleep instead of spinning.

    By default each of torch's OpenMP threads spins for a while at the end of every parallel region. On
    cores that other processes also want, a spinning thread takes the core from the one that has work,
    and a step of many small operations slows catastrophically. Measured on 2 cores (tiny model, one
    cached 448² micro-batch, 2 threads): with two other busy processes 85–180 ms spinning, runs that did
    not finish in 100 s, against 56 ms with OMP_WAIT_POLICY=PASSIVE; on a near-idle machine spinning is
    faster (28 ms against 67 ms). So PASSIVE is chosen only when the load average already fills the cores
    at start; set OMP_WAIT_POLICY or GOMP_SPINCOUNT yourself to decide. It is read when torch loads its
    OpenMP runtime, hence here, before torch is imported (torchrun's workers inherit it). GPUs: no effect.
    """
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ or not hasattr(os, "getloadavg"):
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0]
    if load >= cores:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"note: the CPU is busy (load {load:.1f} on {cores} cores): torch's OpenMP threads wait passively "
                  f"(OMP_WAIT_POLICY=PASSIVE; set it or GOMP_SPINCOUNT to choose)", flush=True)
