"""What `vlmtune train CONFIG.yaml` runs, as LLaMA-Factory's sft workflow does: train (do_train), then predict
(do_predict) — or only predict, for LLaMA-Factory's predict YAML (`do_predict: true` and no do_train, or
`do_train: false`; `predict_with_generate`, `eval_dataset`, `adapter_name_or_path`, ...).

The prediction is `vlmtune predict`'s (`infer/predict.py`) on eval_dataset, with the adapter just trained (the one in
output_dir; with full or freeze fine-tuning, the model in output_dir) or, without training, adapter_name_or_path;
its rows go to output_dir/generated_predictions.jsonl: LLaMA-Factory's `prompt`, `predict`, `label`, and vlmtune's
`id`, `images` and (label scoring) `scores`. predict_with_generate: true generates; false scores the labels when
the answers form a closed label set (LLaMA-Factory's false writes teacher-forced argmax tokens, which are no
answers) and generates otherwise, as the start-up line says.
"""

from __future__ import annotations

import copy
from pathlib import Path

from vlmtune.config import Config
from vlmtune.errors import VlmtuneError

PREDICTIONS = "generated_predictions.jsonl"  # LLaMA-Factory's name, in output_dir


def run_sft(cfg: Config, explicit: set[str] | frozenset[str] = frozenset(), log=print) -> None:
    """Train unless do_train is false (and do_predict true), then predict when do_predict is true.

    `explicit`: the keys the YAML and the command line set (settings given explicitly win over the adapter's)."""
    predict_only = cfg.train.do_predict and not cfg.train.do_train
    if cfg.train.do_predict:
        prediction_config(cfg)  # a missing eval_dataset fails now, not after the training
    if not predict_only:
        from vlmtune.train.loop import train

        train(cfg)
    if cfg.train.do_predict:
        predict_after(cfg, explicit, log)


def prediction_config(cfg: Config) -> Config:
    """The run config of the prediction: eval_dataset as the dataset; the model just trained (or the YAML's)."""
    where = cfg.source or "config"
    if not cfg.data.eval_dataset:
        raise VlmtuneError(f"{where}: do_predict predicts eval_dataset, which is not set")
    pcfg = copy.deepcopy(cfg)
    pcfg.data.dataset = cfg.data.eval_dataset
    if cfg.train.do_train:
        output_dir = cfg.train.output_dir
        if cfg.finetune.finetuning_type == "lora":
            pcfg.model.adapter_name_or_path = output_dir
        else:  # full and freeze fine-tuning save the whole model
            pcfg.model.model_name_or_path, pcfg.model.adapter_name_or_path = output_dir, None
    elif not cfg.model.model_name_or_path and not cfg.model.adapter_name_or_path:
        raise VlmtuneError(f"{where}: do_predict needs model_name_or_path (and adapter_name_or_path for an adapter)")
    return pcfg


def predict_after(cfg: Config, explicit: set[str] | frozenset[str], log=print) -> Path:
    """eval_dataset predicted into output_dir/generated_predictions.jsonl (per_device_eval_batch_size samples per
    batch; overwrite_output_dir replaces an earlier file, else a rerun resumes it)."""
    from vlmtune.infer.predict import PredictArgs, predict

    pcfg = prediction_config(cfg)
    pargs = PredictArgs(save_name=str(Path(cfg.train.output_dir) / PREDICTIONS),
                        batch_size=cfg.train.per_device_eval_batch_size, overwrite=cfg.train.overwrite_output_dir)
    what = f"what training wrote into {cfg.train.output_dir}" if cfg.train.do_train else \
        (pcfg.model.adapter_name_or_path or pcfg.model.model_name_or_path)
    log(f"do_predict: predicting {pcfg.data.eval_dataset} with {what} into {pargs.save_name}")
    return predict(pcfg, pargs, set(explicit) - {"dataset"}, log)
