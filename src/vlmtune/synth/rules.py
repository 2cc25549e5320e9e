"""The seven rules: their Chinese text, their check on a scene, and the prompt built from them.

Each rule has a stable ``key`` (used in the truth sidecar) and a ``number`` (its place in the full
list, and what ``--rules 1,2,5`` selects). A prompt lists only the active rules, renumbered 1..k,
so the texts never refer to each other by number.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vlmtune.synth.scene import KINDS, Scene

POSITIVE = "满足要求"
NEGATIVE = "不满足要求"
SYSTEM_PROMPT = "你是一个商品陈列合规检查助手。"


@dataclass(frozen=True)
class Rule:
    number: int  # 1..7, its place in the full list
    key: str  # stable name used in the truth sidecar
    text: str  # the Chinese rule as it appears in the prompt


RULES: tuple[Rule, ...] = (
    Rule(1, "only_known_kinds",
         "图中只能出现以下五类物体:立方体、圆柱体、圆环、五角星徽章、台灯;不得出现任何其他物体(如球体、圆锥、金字塔)。"),
    Rule(2, "stars_in_rings",
         "每个五角星徽章都必须放在某个圆环中间的孔内;不允许有放在圆环外面的五角星徽章。"),
    Rule(3, "counts_watermark",
         "左上角水印(格式如 cube2 cyl1 ring1 star1 lamp1,依次为立方体、圆柱体、圆环、五角星徽章、台灯的数量)"
         "中的每个数量都必须与图中该类物体的实际数量一致。"),
    Rule(4, "lamp_watermark",
         "左下角水印标注的台灯位置必须与实际一致:lamp: front 表示台灯在前排(位置较低、较大),"
         "lamp: back 表示台灯在后排(位置较高、较小),lamp: none 表示图中没有台灯。"),
    Rule(5, "sum_watermark",
         "右上角水印的数字必须等于图中立方体数量与圆柱体数量之和。"),
    Rule(6, "product_watermark",
         "右下角水印的数字必须等于图中五角星徽章数量与圆环数量的乘积。"),
    Rule(7, "one_lamp",
         "图中必须恰好有一盏台灯,不能没有,也不能多于一盏。"),
)
RULE_BY_NUMBER: dict[int, Rule] = {r.number: r for r in RULES}
RULE_KEYS: tuple[str, ...] = tuple(r.key for r in RULES)
PRESETS: dict[str, tuple[int, ...]] = {"easy": (1, 2), "full": (1, 2, 3, 4, 5, 6, 7)}


def evaluate(scene: Scene) -> dict[str, bool]:
    """Whether each of the seven rules holds for ``scene`` (key -> bool), from the scene alone.

    Written independently of the sampler: it is the check that the sampler did what it was asked.
    """
    counts = scene.counts
    wm = scene.watermarks
    assert wm is not None, "scene has no watermarks"
    return {
        "only_known_kinds": scene.foreign == 0,
        "stars_in_rings": all(o.inside_ring for o in scene.objects if o.kind == "star"),
        "counts_watermark": all(wm.counts.get(k) == counts[k] for k in KINDS),
        "lamp_watermark": wm.lamp == scene.lamp_position,
        "sum_watermark": wm.sum == counts["cube"] + counts["cylinder"],
        "product_watermark": wm.product == counts["star"] * counts["ring"],
        "one_lamp": counts["lamp"] == 1,
    }


def label(held: dict[str, bool], active: Sequence[int]) -> str:
    """满足要求 iff every active rule holds; inactive rules do not matter."""
    return POSITIVE if all(held[RULE_BY_NUMBER[n].key] for n in active) else NEGATIVE


def build_prompt(active: Sequence[int]) -> str:
    """The user turn: the image placeholder, the active rules renumbered 1..k, the answer format."""
    lines = [f"{i}. {RULE_BY_NUMBER[n].text}" for i, n in enumerate(active, start=1)]
    return ("<image>判断以上图片是否满足要求:\n" + "\n".join(lines)
            + '\n请只输出如下格式:"满足要求", 或 "不满足要求"。')
