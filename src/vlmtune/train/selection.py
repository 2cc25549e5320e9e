"""How the best checkpoint is chosen — the metric and its direction — and the start-up check that it can be.

The settings that select (`metric_for_best_model`, `load_best_model_at_end`, `early_stopping_patience`) are
checked against the data before it is encoded: a selection with nothing to select from (no validation split,
no evaluation during training, a metric of label scoring without a label set, or one that a validation split of
one class leaves undefined) is refused in one line, instead of being found inert after the training.
"""

from __future__ import annotations

from typing import Callable, Sequence

from vlmtune.config import Config
from vlmtune.errors import VlmtuneError

SELECTING = ("load_best_model_at_end", "early_stopping_patience")  # settings that act on the best step
ONE_CLASS_SAFE = ("eval_loss", "eval_accuracy")  # metrics that still mean something on one class


def best_metric_rule(cfg: Config, label_set) -> tuple[str, bool]:
    """(the logged name of the metric that picks the best step, whether greater is better)."""
    name = cfg.train.metric_for_best_model or ("f1" if label_set else "eval_loss")
    name = name if name.startswith("eval_") else f"eval_{name}"
    if name == "eval_auc":
        name = "eval_roc_auc"
    greater = cfg.train.greater_is_better
    if greater is None:
        greater = "loss" not in name
    return name, greater


def check_selection(cfg: Config, label_set: Sequence[str] | None, val_answers: Sequence[str | None],
                    log: Callable[[str], None]) -> None:
    """Refuse a best-model selection that could not select (one line naming the setting); say in one line when
    the default metric means little on this validation split."""
    t = cfg.train
    selecting = [key for key in SELECTING if getattr(t, key)]
    settings = ", ".join(selecting)
    if selecting and not val_answers:
        where = "eval_dataset" if cfg.data.eval_dataset else f"val_size {cfg.data.val_size:g}"
        raise VlmtuneError(f"{settings}: there is no validation split ({where} gives none), so no evaluation can "
                           f"pick a best step or stop the run; set val_size (e.g. 0.1) or eval_dataset, or drop "
                           f"{settings}")
    if selecting and t.eval_strategy == "no":
        raise VlmtuneError(f"{settings}: eval_strategy is no, so nothing is evaluated during training to pick a best "
                           f"step or stop the run; set eval_strategy: steps (every eval_steps) or epoch")
    name, _ = best_metric_rule(cfg, label_set)
    chosen = f"metric_for_best_model: {t.metric_for_best_model}"
    if name != "eval_loss" and not label_set and (t.metric_for_best_model or selecting):
        raise VlmtuneError(f"{chosen}: a metric of label scoring, but the answers form no closed label set (set "
                           f"labels: [a, b]), so it would never be logged; use metric_for_best_model: eval_loss")
    distinct = {(answer or "").strip() for answer in val_answers}
    if not label_set or not val_answers or len(distinct) > 1 or name in ONE_CLASS_SAFE:
        return
    one_class = (f"every one of the {len(val_answers)} validation answers is {next(iter(distinct))!r}, so {name} "
                 f"is undefined or meaningless there")
    if t.metric_for_best_model or selecting:
        raise VlmtuneError(f"{chosen if t.metric_for_best_model else settings}: {one_class} and no best step can be "
                           f"picked by it; give the validation split both labels (a larger val_size, or "
                           f"eval_dataset) or use metric_for_best_model: eval_loss")
    log(f"note: {one_class}; the validation split needs both labels for precision, recall, F1 and AUC")
