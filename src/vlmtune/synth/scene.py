"""What a synthetic scene contains, and how one is sampled.

A scene is pure data: objects with a kind, a depth row and a pixel bounding box, plus the four
watermark values *as they will be drawn*. Rendering (draw.py) and rule checking (rules.py) both
read this one structure, so the sidecar truth, the label and the pixels cannot drift apart.

Sampling is *constructive*: the caller says which of the seven rules must be broken, and the
sampler builds a scene that breaks exactly those (and holds the rest). rules.evaluate() re-checks
the result independently; the dataset writer refuses a scene where the two disagree.

Layout (fractions of the image side S), chosen so nothing ever overlaps a watermark plate or an
object of the other row, which keeps the instance map in tests exact:

    0.00-0.08  top watermark band      0.42  horizon (wall above, floor below)
    0.52       back-row baseline       0.87  front-row baseline
    0.92-1.00  bottom watermark band
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

# The five kinds the rules allow, in watermark order; short names are what the top-left
# watermark prints (Pillow's bundled default font has no CJK glyphs, so watermarks are ASCII).
KINDS: tuple[str, ...] = ("cube", "cylinder", "ring", "star", "lamp")
KIND_ABBR: dict[str, str] = {"cube": "cube", "cylinder": "cyl", "ring": "ring", "star": "star", "lamp": "lamp"}
KIND_ZH: dict[str, str] = {"cube": "立方体", "cylinder": "圆柱体", "ring": "圆环", "star": "五角星徽章", "lamp": "台灯"}
# Objects that break rule 1 ("only the five kinds"); drawn in the same shaded style and palette,
# so only the shape tells them apart.
FOREIGN_KINDS: tuple[str, ...] = ("sphere", "cone", "pyramid")
DEPTHS: tuple[str, ...] = ("front", "back")
LAMP_POSITIONS: tuple[str, ...] = ("front", "back", "none")

# Saturated colours that stand out against every background palette in draw.py.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (205, 45, 45),
    "orange": (235, 130, 30),
    "yellow": (225, 195, 40),
    "green": (50, 160, 70),
    "teal": (30, 150, 150),
    "blue": (45, 85, 200),
    "purple": (130, 60, 180),
    "pink": (225, 100, 160),
    "white": (235, 235, 240),
    "black": (45, 45, 50),
}
N_BACKGROUNDS = 4  # number of wall/floor palettes in draw.py

# Geometry, as fractions of the image side (see the module docstring).
HORIZON = 0.42
BASELINE = {"back": 0.52, "front": 0.87}
UNIT = {"front": 0.20, "back": 0.13}  # object size unit per row: front objects are larger
SLOTS = {"front": 4, "back": 5}  # objects per row; slots keep objects from overlapping
# (width, height) of each kind in units; a star inside a ring gets no slot of its own.
SHAPE = {
    "cube": (0.80, 0.80),
    "cylinder": (0.70, 0.95),
    "ring": (0.90, 0.90),
    "star": (0.72, 0.72),
    "lamp": (0.72, 1.45),
    "sphere": (0.78, 0.78),
    "cone": (0.72, 1.00),
    "pyramid": (0.92, 0.80),
}
HOLE_FRACTION = 0.56  # ring hole diameter / ring outer diameter
MAX_ITEMS = 8  # slot-taking objects per scene (9 slots exist; one spare keeps scenes airy)


@dataclass
class SceneObject:
    """One drawn object.

    ``bbox`` is ``(x0, y0, x1, y1)`` in pixels, inclusive; the renderer fits the shape to it.
    ``ring`` is, for a star drawn inside a ring's hole, the index of that ring in ``Scene.objects``.
    """

    kind: str
    depth: str
    bbox: tuple[int, int, int, int]
    colour: str
    ring: int | None = None

    @property
    def inside_ring(self) -> bool:
        return self.ring is not None

    def to_dict(self) -> dict:
        out = {"kind": self.kind, "position": self.depth, "bbox": list(self.bbox), "colour": self.colour}
        if self.kind == "star":
            out["inside_ring"] = self.inside_ring
            out["ring"] = self.ring
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "SceneObject":
        return cls(d["kind"], d["position"], tuple(d["bbox"]), d["colour"], d.get("ring"))


@dataclass
class Watermarks:
    """The four corner values as drawn (they may be wrong on purpose)."""

    counts: dict[str, int]  # top-left: per kind, in KINDS order
    lamp: str  # bottom-left: "front" | "back" | "none"
    sum: int  # top-right: meant to be cubes + cylinders
    product: int  # bottom-right: meant to be stars x rings

    def texts(self) -> dict[str, str]:
        """Corner -> the exact string drawn there."""
        return {
            "top_left": " ".join(f"{KIND_ABBR[k]}{self.counts[k]}" for k in KINDS),
            "bottom_left": f"lamp: {self.lamp}",
            "top_right": str(self.sum),
            "bottom_right": str(self.product),
        }

    def to_dict(self) -> dict:
        texts = self.texts()
        return {
            "top_left": {"value": dict(self.counts), "text": texts["top_left"]},
            "bottom_left": {"value": self.lamp, "text": texts["bottom_left"]},
            "top_right": {"value": self.sum, "text": texts["top_right"]},
            "bottom_right": {"value": self.product, "text": texts["bottom_right"]},
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Watermarks":
        return cls(dict(d["top_left"]["value"]), d["bottom_left"]["value"], d["top_right"]["value"],
                   d["bottom_right"]["value"])


@dataclass
class Scene:
    size: int
    background: int
    objects: list[SceneObject] = field(default_factory=list)
    watermarks: Watermarks | None = None

    @property
    def counts(self) -> dict[str, int]:
        """True number of objects of each of the five kinds (foreign objects not included)."""
        out = {k: 0 for k in KINDS}
        for o in self.objects:
            if o.kind in out:
                out[o.kind] += 1
        return out

    @property
    def foreign(self) -> int:
        return sum(o.kind not in KINDS for o in self.objects)

    @property
    def lamp_position(self) -> str:
        """The lamps' row: front, back, none without lamps ("mixed" is never sampled)."""
        rows = {o.depth for o in self.objects if o.kind == "lamp"}
        if not rows:
            return "none"
        return rows.pop() if len(rows) == 1 else "mixed"

    @property
    def stars_in_rings(self) -> int:
        return sum(o.kind == "star" and o.inside_ring for o in self.objects)

    def to_dict(self) -> dict:
        assert self.watermarks is not None
        return {
            "size": self.size,
            "background": self.background,
            "objects": [o.to_dict() for o in self.objects],
            "counts": self.counts,
            "foreign": self.foreign,
            "lamp_position": self.lamp_position,
            "watermarks": self.watermarks.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        """Rebuild from :meth:`to_dict` output (or a truth line, which contains those keys)."""
        return cls(d["size"], d["background"], [SceneObject.from_dict(o) for o in d["objects"]],
                   Watermarks.from_dict(d["watermarks"]))


def caption(scene: Scene, lang: str = "zh") -> str:
    """A one-line description of what is in the scene (not of its watermarks).

    Used to pretrain a tiny model to *read* scenes before it learns the rules, so it names every
    quantity a rule depends on: the count of each kind, how many stars sit inside rings, the lamp's
    row and the number of foreign objects.
    """
    c = scene.counts
    lamp = scene.lamp_position
    if lang == "zh":
        where = {"front": "前排", "back": "后排", "none": "无", "mixed": "前后排都有"}[lamp]
        return (f"立方体{c['cube']} 圆柱体{c['cylinder']} 圆环{c['ring']} 五角星{c['star']} "
                f"环内五角星{scene.stars_in_rings} 台灯{c['lamp']} 台灯位置:{where} 其他物体{scene.foreign}")
    if lang == "en":
        return (f"cube{c['cube']} cylinder{c['cylinder']} ring{c['ring']} star{c['star']} "
                f"star_in_ring{scene.stars_in_rings} lamp{c['lamp']} lamp:{lamp} other{scene.foreign}")
    raise ValueError(f"caption: unknown lang {lang!r} (expected 'zh' or 'en')")


# --------------------------------------------------------------------------------------------
# Sampling


def _perturb(rng: random.Random, true: int, deltas: tuple[int, ...] = (-2, -1, 1, 2)) -> int:
    """A wrong but plausible count: near the truth, never negative."""
    options = [true + d for d in deltas if true + d >= 0]
    return rng.choice(options)


def sample_scene(rng: random.Random, size: int, broken: set[str] | frozenset[str]) -> Scene:
    """Sample a scene that breaks exactly the rules whose keys are in ``broken``.

    Rule keys are those of rules.RULES: only_known_kinds, stars_in_rings, counts_watermark,
    lamp_watermark, sum_watermark, product_watermark, one_lamp.
    """
    # -- how many of each thing. Rings and stars are usually present so rule 2 is rarely vacuous.
    n_lamp = rng.choice((0, 2)) if "one_lamp" in broken else 1
    n_ring = rng.choices((0, 1, 2), weights=(0.15, 0.5, 0.35))[0]
    if "stars_in_rings" in broken:
        n_out = rng.choices((1, 2), weights=(0.75, 0.25))[0]
        n_in = rng.randint(0, n_ring)
    else:
        n_out = 0
        n_in = rng.randint(1, n_ring) if n_ring and rng.random() < 0.85 else 0
    foreign = ([rng.choice(FOREIGN_KINDS) for _ in range(rng.choices((1, 2), weights=(0.8, 0.2))[0])]
               if "only_known_kinds" in broken else [])
    n_cube, n_cyl = rng.randint(0, 3), rng.randint(0, 3)
    # Cubes and cylinders are the only free counts: trim them to fit the slots.
    while n_lamp + n_ring + n_out + len(foreign) + n_cube + n_cyl > MAX_ITEMS:
        if n_cube and (not n_cyl or rng.random() < 0.5):
            n_cube -= 1
        else:
            n_cyl -= 1

    # -- slot items: (kind, star_inside). Lamps share one row so "the lamp's position" is defined.
    lamp_row = rng.choice(DEPTHS)
    rings_with_star = [True] * n_in + [False] * (n_ring - n_in)
    rng.shuffle(rings_with_star)
    items = ([("cube", False)] * n_cube + [("cylinder", False)] * n_cyl
             + [("ring", s) for s in rings_with_star] + [("star", False)] * n_out
             + [(k, False) for k in foreign])
    rng.shuffle(items)
    rows: dict[str, list[tuple[str, bool]]] = {"front": [], "back": []}
    rows[lamp_row] += [("lamp", False)] * n_lamp
    for item in items:
        free = [r for r in DEPTHS if len(rows[r]) < SLOTS[r]]
        rows[rng.choice(free)].append(item)

    # -- geometry. Back row first: it is drawn first, so front objects paint over it (they never
    # actually overlap given the layout constants, but the order is the natural one).
    objects: list[SceneObject] = []
    for depth in ("back", "front"):
        row = rows[depth]
        slots = rng.sample(range(SLOTS[depth]), len(row))
        slot_w = size / SLOTS[depth]
        unit = UNIT[depth] * size
        for (kind, star_inside), slot in zip(row, slots):
            # A lone star is sometimes as small as one in a ring, so size alone never tells them apart.
            scale = rng.uniform(0.6, 1.05) if kind == "star" else rng.uniform(0.9, 1.1)
            w = round(SHAPE[kind][0] * unit * scale)
            h = round(SHAPE[kind][1] * unit * scale)
            if kind == "cube":
                h = w  # the oblique cube is drawn in a square box
            # Centre jitter keeps the object inside its slot.
            cx = slot_w * (slot + 0.5) + rng.uniform(-1, 1) * max(0.0, (slot_w - w) / 2 - 1)
            base = (BASELINE[depth] + rng.uniform(-0.012, 0.012)) * size
            x0, y1 = round(cx - w / 2), round(base)
            objects.append(SceneObject(kind, depth, (x0, y1 - h, x0 + w, y1), rng.choice(list(PALETTE))))
            if star_inside:
                ring_index = len(objects) - 1
                rx0, ry0, rx1, ry1 = objects[-1].bbox
                # The star sits centred in the hole, a little smaller than it (at least a pixel
                # clear of the ring even in tiny images, so it never looks like it overlaps).
                hole = (rx1 - rx0) * HOLE_FRACTION / 2
                r = min(hole * 0.86, hole - 1.5)
                scx, scy = (rx0 + rx1) / 2, (ry0 + ry1) / 2
                sb = (round(scx - r), round(scy - r), round(scx + r), round(scy + r))
                colour = rng.choice([c for c in PALETTE if c != objects[-1].colour])  # visible on its ring
                objects.append(SceneObject("star", depth, sb, colour, ring=ring_index))

    scene = Scene(size, rng.randrange(N_BACKGROUNDS), objects)

    # -- watermarks: the truth, then the requested lies.
    counts = scene.counts
    drawn = dict(counts)
    if "counts_watermark" in broken:
        for kind in rng.sample(KINDS, rng.choices((1, 2), weights=(0.8, 0.2))[0]):
            drawn[kind] = _perturb(rng, counts[kind], (-1, 1, 1, 2))
    lamp = scene.lamp_position
    if "lamp_watermark" in broken:
        lamp = rng.choice([p for p in LAMP_POSITIONS if p != lamp])
    total = counts["cube"] + counts["cylinder"]
    if "sum_watermark" in broken:
        total = _perturb(rng, total)
    product = counts["star"] * counts["ring"]
    if "product_watermark" in broken:
        true = product
        options = [true + d for d in (-2, -1, 1, 2) if true + d >= 0]
        # The classic slip: adding instead of multiplying.
        options += [counts["star"] + counts["ring"]] * 2
        product = rng.choice([v for v in options if v != true])
    scene.watermarks = Watermarks(drawn, lamp, total, product)
    return scene
