"""Rendering a Scene with flat-shaded primitives that read as 3-D solids.

Every primitive goes through :class:`_Canvas`, which can draw the same geometry twice: once in
colour into the picture and once with the object's id into a parallel 8-bit *instance map*
(0 = background, 1..N = ``Scene.objects[i-1]``, SHADOW_ID = floor shadows, PLATE_ID = watermark
plates). Tests use the map to check that what the truth sidecar says was drawn is what was drawn.

Speed matters (thousands of images for training): the background of each (size, palette) is built
once with numpy and copied; shapes are a handful of PIL polygon/ellipse calls each; there is no
anti-aliasing, which also keeps the instance map pixel-exact.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vlmtune.synth.scene import HOLE_FRACTION, HORIZON, PALETTE, UNIT, Scene

SHADOW_ID = 254
PLATE_ID = 255
PLATE_FILL = (28, 28, 32)
TEXT_FILL = (245, 245, 245)

Colour = tuple[int, int, int]
# (wall top, wall bottom, floor far, floor near); muted so the saturated objects stand out.
BACKGROUNDS: tuple[tuple[Colour, Colour, Colour, Colour], ...] = (
    ((222, 226, 232), (196, 202, 210), (176, 150, 118), (140, 110, 80)),  # grey wall, wooden floor
    ((236, 228, 212), (214, 202, 182), (160, 160, 164), (120, 120, 126)),  # cream wall, grey floor
    ((210, 222, 214), (186, 200, 190), (190, 176, 150), (150, 134, 108)),  # sage wall, sand floor
    ((226, 218, 228), (204, 194, 208), (150, 140, 150), (110, 100, 112)),  # lilac wall, slate floor
)


def tone(c: Colour, t: float) -> Colour:
    """Shade a colour: t in [-1, 1], negative darkens towards black, positive lightens to white."""
    if t >= 0:
        return tuple(round(v + (255 - v) * t) for v in c)  # type: ignore[return-value]
    return tuple(round(v * (1 + t)) for v in c)  # type: ignore[return-value]


class _Canvas:
    """Draws each primitive into the picture and, when asked, with id ``oid`` into the id map."""

    def __init__(self, rgb: Image.Image, ids: Image.Image | None, empty: Image.Image):
        self.rgb, self.ids, self.empty = rgb, ids, empty
        self.d = ImageDraw.Draw(rgb)
        self.i = ImageDraw.Draw(ids) if ids is not None else None
        self.oid = 0

    def polygon(self, pts, fill: Colour) -> None:
        pts = [(round(x), round(y)) for x, y in pts]
        self.d.polygon(pts, fill=fill)
        if self.i:
            self.i.polygon(pts, fill=self.oid)

    def ellipse(self, box, fill: Colour | None = None, outline: Colour | None = None, width: int = 1) -> None:
        box = [round(v) for v in box]
        self.d.ellipse(box, fill=fill, outline=outline, width=width)
        if self.i:
            self.i.ellipse(box, fill=None if fill is None else self.oid,
                           outline=None if outline is None else self.oid, width=width)

    def hole(self, box) -> None:
        """Cut an elliptic hole back to the empty room (and to id 0). Used for the ring: PIL's
        wide ellipse outlines leave stray pixels at small sizes; filled ellipses do not."""
        x0, y0, x1, y1 = (round(v) for v in box)
        mask = Image.new("L", (x1 - x0 + 1, y1 - y0 + 1), 0)
        ImageDraw.Draw(mask).ellipse((0, 0, x1 - x0, y1 - y0), fill=255)
        region = (x0, y0, x1 + 1, y1 + 1)
        self.rgb.paste(self.empty.crop(region), region, mask)
        if self.ids is not None:
            self.ids.paste(0, region, mask)

    def rect(self, box, fill: Colour) -> None:
        box = [round(v) for v in box]
        self.d.rectangle(box, fill=fill)
        if self.i:
            self.i.rectangle(box, fill=self.oid)


# Brightness across a round surface lit from the upper left: light at 30 % of the width.
def _profile(k: int) -> list[float]:
    return [0.35 * math.cos((j + 0.5) / k * math.pi * 1.15 - 0.35 * math.pi) - 0.12 for j in range(k)]


def _stripes(cv: _Canvas, x0: float, x1: float, y0: float, y1: float, c: Colour) -> None:
    """A vertical-stripe gradient over a rectangle: the side of a cylinder."""
    k = max(2, min(10, round(x1 - x0) // 3))
    for j, t in enumerate(_profile(k)):
        a = x0 + (x1 - x0) * j / k
        b = x0 + (x1 - x0) * (j + 1) / k
        cv.rect((a, y0, b, y1), tone(c, t))


def _cube(cv: _Canvas, box, c: Colour) -> None:
    x0, y0, x1, y1 = box
    w = x1 - x0
    s = round(0.74 * w)  # front face side; the rest is the receding depth
    d = w - s
    cv.rect((x0, y1 - s, x0 + s, y1), c)
    cv.polygon([(x0, y1 - s), (x0 + d, y0), (x1, y0), (x0 + s, y1 - s)], tone(c, 0.35))  # top
    cv.polygon([(x0 + s, y1 - s), (x1, y0), (x1, y1 - d), (x0 + s, y1)], tone(c, -0.35))  # side


def _cylinder(cv: _Canvas, box, c: Colour) -> None:
    x0, y0, x1, y1 = box
    e = (x1 - x0) * 0.32  # ellipse height: we look slightly from above
    cv.ellipse((x0, y1 - e, x1, y1), fill=tone(c, -0.15))
    _stripes(cv, x0, x1, y0 + e / 2, y1 - e / 2, c)
    cv.ellipse((x0, y0, x1, y0 + e), fill=tone(c, 0.3))


def _ring(cv: _Canvas, box, c: Colour) -> None:
    """A torus standing upright, facing us: concentric bands, dark at the rims, light mid-tube."""
    x0, y0, x1, y1 = box
    t = (x1 - x0) * (1 - HOLE_FRACTION) / 2  # tube thickness
    bands = (-0.45, -0.15, 0.25, 0.1, -0.3)
    for j, shade in enumerate(bands):  # filled discs, outermost first, then the hole cut out
        s = t * j / len(bands)
        cv.ellipse((x0 + s, y0 + s, x1 - s, y1 - s), fill=tone(c, shade))
    cv.hole((x0 + t, y0 + t, x1 - t, y1 - t))


def _star_points(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    pts = []
    for j in range(10):
        rad = r if j % 2 == 0 else r * 0.42
        a = math.radians(-90 + 36 * j)
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _star(cv: _Canvas, box, c: Colour) -> None:
    """A five-point star badge with a bevel: each arm is two facets, lit from the upper left."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    r = min(x1 - x0, y1 - y0) / 2
    # A 5-point star's outer points only span 0.95 r below the centre; drop it so it stands.
    cy += r * 0.095
    pts = _star_points(cx, cy, r)
    for j in range(10):
        a, b = pts[j], pts[(j + 1) % 10]
        mid = math.atan2((a[1] + b[1]) / 2 - cy, (a[0] + b[0]) / 2 - cx)
        t = 0.3 * math.cos(mid - math.radians(225)) + (0.12 if j % 2 == 0 else -0.12)
        cv.polygon([(cx, cy), a, b], tone(c, t))


def _lamp(cv: _Canvas, box, c: Colour) -> None:
    """Base (a flat cylinder) + stem + conical shade, the shade in the object's colour."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    cx = (x0 + x1) / 2
    metal = (150, 150, 156)
    bh = 0.1 * h  # base height
    cv.ellipse((cx - 0.3 * w, y1 - bh * 0.6, cx + 0.3 * w, y1), fill=tone(metal, -0.3))
    cv.rect((cx - 0.3 * w, y1 - bh * 0.7, cx + 0.3 * w, y1 - bh * 0.3), tone(metal, -0.1))
    cv.ellipse((cx - 0.3 * w, y1 - bh, cx + 0.3 * w, y1 - bh * 0.4), fill=tone(metal, 0.25))
    _stripes(cv, cx - 0.045 * w, cx + 0.045 * w, y0 + 0.36 * h, y1 - bh * 0.7, metal)
    # Shade: a truncated cone, sliced into quads for the gradient.
    top, bot = y0 + 0.03 * h, y0 + 0.40 * h
    k = 8
    for j, t in enumerate(_profile(k)):
        ta = cx - 0.25 * w + 0.5 * w * j / k
        tb = cx - 0.25 * w + 0.5 * w * (j + 1) / k
        ba = x0 + w * j / k
        bb = x0 + w * (j + 1) / k
        cv.polygon([(ta, top), (tb, top), (bb, bot), (ba, bot)], tone(c, t))
    cv.ellipse((x0, bot - 0.04 * h, x1, bot + 0.04 * h), fill=tone(c, -0.5))  # the open bottom
    cv.ellipse((cx - 0.25 * w, y0, cx + 0.25 * w, y0 + 0.06 * h), fill=tone(c, 0.35))  # the top


def _sphere(cv: _Canvas, box, c: Colour) -> None:
    x0, y0, x1, y1 = box
    r = (x1 - x0) / 2
    cx, cy = x0 + r, y0 + r
    shades = (-0.4, -0.2, 0.0, 0.15, 0.3, 0.5)
    for j, t in enumerate(shades):
        f = 1 - j / len(shades)  # shrinking discs drifting towards the highlight (upper left)
        rr = r * f
        ox, oy = cx - (r - rr) * 0.55, cy - (r - rr) * 0.55
        cv.ellipse((ox - rr, oy - rr, ox + rr, oy + rr), fill=tone(c, t))


def _cone(cv: _Canvas, box, c: Colour) -> None:
    x0, y0, x1, y1 = box
    w = x1 - x0
    e = 0.28 * w
    cx, ecy = (x0 + x1) / 2, y1 - e / 2
    cv.ellipse((x0, y1 - e, x1, y1), fill=tone(c, -0.2))
    k = 8
    prof = _profile(k)
    for j in range(k):  # fan of triangles from the apex to the front half of the base ellipse
        a1, a2 = math.pi - math.pi * j / k, math.pi - math.pi * (j + 1) / k
        p1 = (cx + w / 2 * math.cos(a1), ecy + e / 2 * math.sin(a1))
        p2 = (cx + w / 2 * math.cos(a2), ecy + e / 2 * math.sin(a2))
        cv.polygon([(cx, y0), p1, p2], tone(c, prof[j]))


def _pyramid(cv: _Canvas, box, c: Colour) -> None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    apex = (x0 + 0.45 * w, y0)
    left, front, right = (x0, y1 - 0.22 * h), (x0 + 0.55 * w, y1), (x1, y1 - 0.3 * h)
    cv.polygon([apex, left, front], tone(c, 0.2))
    cv.polygon([apex, front, right], tone(c, -0.35))


SHAPES = {
    "cube": _cube, "cylinder": _cylinder, "ring": _ring, "star": _star, "lamp": _lamp,
    "sphere": _sphere, "cone": _cone, "pyramid": _pyramid,
}


@lru_cache(maxsize=32)
def _background(size: int, index: int) -> Image.Image:
    """Wall with a vertical gradient, floor darkening towards the viewer, a skirting line."""
    wall_top, wall_bot, floor_far, floor_near = BACKGROUNDS[index]
    horizon = round(HORIZON * size)
    y = np.arange(size, dtype=np.float32)[:, None]
    tw = np.clip(y / max(1, horizon), 0, 1)
    tf = np.clip((y - horizon) / max(1, size - horizon), 0, 1)
    wall = np.array(wall_top) * (1 - tw) + np.array(wall_bot) * tw
    floor = np.array(floor_far) * (1 - tf) + np.array(floor_near) * tf
    col = np.where(y < horizon, wall, floor)  # (size, 3)
    arr = np.repeat(col[:, None, :], size, axis=1).round().astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    d = ImageDraw.Draw(img)
    d.line([(0, horizon), (size, horizon)], fill=tone(floor_far, -0.3), width=max(1, size // 160))
    return img


def background(size: int, index: int) -> Image.Image:
    """A fresh copy of the empty room (what tests diff against)."""
    return _background(size, index).copy()


# ------------------------------------------------------------------------------------ watermarks


def font_size(size: int) -> int:
    return max(8, round(size * 0.045))


@lru_cache(maxsize=8)
def _font(px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Pillow's bundled font (>= 10.1): identical everywhere, no system font needed, ASCII only.
    return ImageFont.load_default(size=px)


def watermark_plate(text: str, size: int) -> Image.Image:
    """The opaque plate a watermark is drawn on, as an image (tests re-render expected text)."""
    font = _font(font_size(size))
    pad = max(2, font_size(size) // 4)
    left, _, right, _ = font.getbbox(text)
    # Height from a fixed reference string, so all four plates have the same height.
    _, top, _, bottom = font.getbbox("Ag09:")
    plate = Image.new("RGB", (right - left + 2 * pad, bottom - top + 2 * pad), PLATE_FILL)
    ImageDraw.Draw(plate).text((pad - left, pad - top), text, font=font, fill=TEXT_FILL)
    return plate


def watermark_boxes(scene: Scene) -> dict[str, tuple[str, tuple[int, int, int, int]]]:
    """Corner -> (text, (x0, y0, x1, y1) exclusive box of its plate)."""
    assert scene.watermarks is not None
    s = scene.size
    m = max(2, s // 100)
    out = {}
    for corner, text in scene.watermarks.texts().items():
        w, h = watermark_plate(text, s).size
        x = m if corner.endswith("left") else s - m - w
        y = m if corner.startswith("top") else s - m - h
        out[corner] = (text, (x, y, x + w, y + h))
    return out


# ---------------------------------------------------------------------------------------- render


def render(scene: Scene, with_ids: bool = False):
    """Draw ``scene``. Returns the RGB image, or ``(rgb, ids)`` with the instance map ("L")."""
    empty = _background(scene.size, scene.background)
    rgb = empty.copy()
    ids = Image.new("L", rgb.size, 0) if with_ids else None
    cv = _Canvas(rgb, ids, empty)
    floor_far = BACKGROUNDS[scene.background][2]
    # Contact shadows ground the objects on the floor. All of them go first: a shadow reaches a
    # little beyond its object and must never paint over a neighbour.
    cv.oid = SHADOW_ID
    for obj in scene.objects:
        if not obj.inside_ring:
            x0, y0, x1, y1 = obj.bbox
            w, u = x1 - x0, UNIT[obj.depth] * scene.size
            cv.ellipse((x0 - 0.06 * w, y1 - 0.05 * u, x1 + 0.1 * w, y1 + 0.045 * u), fill=tone(floor_far, -0.35))
    # Objects in list order: back row, then front row; a ring's star right after its ring.
    for index, obj in enumerate(scene.objects):
        cv.oid = index + 1
        SHAPES[obj.kind](cv, obj.bbox, PALETTE[obj.colour])
    for text, (x0, y0, x1, y1) in watermark_boxes(scene).values():
        rgb.paste(watermark_plate(text, scene.size), (x0, y0))
        if ids is not None:
            ImageDraw.Draw(ids).rectangle((x0, y0, x1 - 1, y1 - 1), fill=PLATE_ID)
    return (rgb, ids) if with_ids else rgb
