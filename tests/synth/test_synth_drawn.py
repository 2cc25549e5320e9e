"""The truth sidecar must describe what is in the PNG, checked through the instance map.

For each sample the scene is rebuilt from its truth line and rendered again with an instance map;
the re-render must equal the saved PNG pixel for pixel, so the map describes the saved image. Then
every claim of the truth is checked against pixels: counts per kind, that nothing was drawn that
the map does not account for, stars inside ring holes, front below back, the lamp's row, and the
watermark plates against independently formatted expected text.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vlmtune.synth import draw, generate
from vlmtune.synth.rules import POSITIVE, RULE_BY_NUMBER
from vlmtune.synth.scene import KINDS, Scene


def expected_texts(values: dict) -> dict[str, str]:
    """The watermark strings written out here, independently of Watermarks.texts()."""
    c = values["top_left"]
    return {
        "top_left": f"cube{c['cube']} cyl{c['cylinder']} ring{c['ring']} star{c['star']} lamp{c['lamp']}",
        "bottom_left": f"lamp: {values['bottom_left']}",
        "top_right": str(values["top_right"]),
        "bottom_right": str(values["bottom_right"]),
    }


def pixel_boxes(ids: np.ndarray, n: int) -> dict[int, tuple[int, int, int, int, int]]:
    """id -> (x0, y0, x1, y1, pixel count) of its visible pixels."""
    out = {}
    for i in range(1, n + 1):
        ys, xs = np.nonzero(ids == i)
        if len(xs):
            out[i] = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()), len(xs))
    return out


@pytest.fixture(params=[224, 128, 448])
def drawn_set(request, full_set, tmp_path_factory, load):
    """The shared 224 px set, plus small sets at the smallest allowed and the default size."""
    if request.param == 224:
        return full_set
    out = tmp_path_factory.mktemp(f"synth_{request.param}")
    return (out, *load(generate(25, out, seed=request.param, name="s", image_size=request.param)))


def test_truth_agrees_with_pixels(drawn_set):
    out, _, truths = drawn_set
    checked_in_ring = checked_out_ring = 0
    for t in truths:
        where = t["id"]
        saved = np.asarray(Image.open(out / t["image"]).convert("RGB"))
        scene = Scene.from_dict(t)
        rgb, ids = draw.render(scene, with_ids=True)
        assert np.array_equal(np.asarray(rgb), saved), f"{where}: truth scene does not reproduce the PNG"
        ids = np.asarray(ids)
        objs = t["objects"]
        size = t["size"]

        # Nothing is drawn outside what the instance map accounts for (objects, shadows, plates).
        changed = (saved != np.asarray(draw.background(size, t["background"]))).any(axis=2)
        assert not (changed & (ids == 0)).any(), f"{where}: pixels drawn that no object/plate explains"

        boxes = pixel_boxes(ids, len(objs))
        # Every listed object is visible, inside its recorded bbox, and really drawn (not bg-coloured).
        assert set(boxes) == set(range(1, len(objs) + 1)), f"{where}: some object has no visible pixels"
        for i, o in enumerate(objs, start=1):
            x0, y0, x1, y1, npx = boxes[i]
            bx0, by0, bx1, by1 = o["bbox"]
            assert bx0 - 1 <= x0 and by0 - 1 <= y0 and x1 <= bx1 + 1 and y1 <= by1 + 1, f"{where}: object {i} outside bbox"
            assert npx >= max(8, size * size // 5000), f"{where}: object {i} ({o['kind']}) nearly invisible"
            assert changed[ids == i].mean() > 0.9, f"{where}: object {i} drawn in background colour"
            for corner, wm in t["watermarks"].items():  # no plate hides part of an object
                px0, py0, px1, py1 = wm["box"]
                assert bx1 < px0 or bx0 >= px1 or by1 < py0 or by0 >= py1, f"{where}: object {i} under {corner}"

        # Counts per kind from the map equal the sidecar counts; foreign objects are the rest.
        pixel_counts = {k: sum(objs[i - 1]["kind"] == k for i in boxes) for k in KINDS}
        assert pixel_counts == t["counts"], where
        assert len(boxes) - sum(pixel_counts.values()) == t["foreign"], where

        # Rows from pixels: the front row stands lower (bottom edge) than the back row, and a kind's
        # front objects are larger than its back ones (stars vary in size on purpose, so not them).
        bottoms = {i: boxes[i][3] for i in boxes if not objs[i - 1].get("inside_ring")}
        front = [b for i, b in bottoms.items() if objs[i - 1]["position"] == "front"]
        back = [b for i, b in bottoms.items() if objs[i - 1]["position"] == "back"]
        if front and back:
            assert min(front) > max(back) + 0.2 * size, f"{where}: front not lower than back"
        for i, b in bottoms.items():
            assert (b > 0.7 * size) == (objs[i - 1]["position"] == "front"), f"{where}: object {i} row"
        for k in ("cube", "cylinder", "ring", "lamp"):
            hf = [boxes[i][3] - boxes[i][1] for i in boxes if objs[i - 1]["kind"] == k and objs[i - 1]["position"] == "front"]
            hb = [boxes[i][3] - boxes[i][1] for i in boxes if objs[i - 1]["kind"] == k and objs[i - 1]["position"] == "back"]
            if hf and hb:
                assert min(hf) > max(hb), f"{where}: front {k} not larger than back {k}"
        lamp_rows = {objs[i - 1]["position"] for i in bottoms if objs[i - 1]["kind"] == "lamp"}
        assert t["lamp_position"] == (lamp_rows.pop() if len(lamp_rows) == 1 else "none"), where

        # Stars: one marked inside a ring lies wholly in that ring's hole; others touch no ring.
        ring_ids = [i for i in boxes if objs[i - 1]["kind"] == "ring"]
        for i in boxes:
            o = objs[i - 1]
            if o["kind"] != "star":
                continue
            sy, sx = np.nonzero(ids == i)
            if o["inside_ring"]:
                ring = o["ring"] + 1
                assert objs[ring - 1]["kind"] == "ring", where
                rmask = ids == ring
                # Enclosed: from every star pixel, the ring is met going left, right, up and down.
                for x, y in zip(sx, sy):
                    assert rmask[y, :x].any() and rmask[y, x + 1:].any() and rmask[:y, x].any() \
                        and rmask[y + 1:, x].any(), f"{where}: star {i} not inside ring {ring}'s hole"
                # And it covers none of the ring: the ring drawn without the star has no more pixels.
                alone = Scene.from_dict(t)
                del alone.objects[i - 1]  # a star comes after its ring, so the ring keeps its id
                _, ids_alone = draw.render(alone, with_ids=True)
                assert (np.asarray(ids_alone) == ring).sum() == rmask.sum(), f"{where}: star {i} covers ring {ring}"
                checked_in_ring += 1
            else:
                for r in ring_ids:
                    x0, y0, x1, y1, _ = boxes[r]
                    overlap = (sx >= x0) & (sx <= x1) & (sy >= y0) & (sy <= y1)
                    assert not overlap.any(), f"{where}: star {i} marked outside but overlaps ring {r}"
                checked_out_ring += 1

        # Watermarks: the text recorded is the text the values imply, and the pixels in each corner
        # are exactly a plate with that text; a plate with a wrong value would not match.
        values = {c: t["watermarks"][c]["value"] for c in t["watermarks"]}
        texts = expected_texts(values)
        for corner, wm in t["watermarks"].items():
            assert wm["text"] == texts[corner], f"{where}: {corner} text"
            x0, y0, x1, y1 = wm["box"]
            crop = saved[y0:y1, x0:x1]
            assert np.array_equal(crop, np.asarray(draw.watermark_plate(texts[corner], size))), f"{where}: {corner} pixels"
            assert (ids[y0:y1, x0:x1] == draw.PLATE_ID).all(), where

        # Rules re-derived from pixel facts + drawn values equal the sidecar; label = AND of active.
        c = pixel_counts
        held = {
            "only_known_kinds": t["foreign"] == 0,
            "stars_in_rings": all(o["inside_ring"] for o in objs if o["kind"] == "star"),
            "counts_watermark": values["top_left"] == c,
            "lamp_watermark": values["bottom_left"] == t["lamp_position"],
            "sum_watermark": values["top_right"] == c["cube"] + c["cylinder"],
            "product_watermark": values["bottom_right"] == c["star"] * c["ring"],
            "one_lamp": c["lamp"] == 1,
        }
        assert held == t["rules_held"], where
        active = [RULE_BY_NUMBER[n].key for n in t["active_rule_numbers"]]
        assert t["active_rules"] == active
        assert t["broken_rules"] == [k for k in active if not held[k]], where
        assert (t["label"] == POSITIVE) == all(held[k] for k in active), where
    # The data set exercised both kinds of star.
    assert checked_in_ring > 0 and checked_out_ring > 0


def test_watermark_plate_discriminates():
    """The corner comparison above can fail: plates for different values differ in pixels."""
    a = np.asarray(draw.watermark_plate("cube1 cyl2 ring1 star1 lamp1", 224))
    b = np.asarray(draw.watermark_plate("cube1 cyl3 ring1 star1 lamp1", 224))
    assert a.shape == b.shape and not np.array_equal(a, b)
    x = np.asarray(draw.watermark_plate("lamp: front", 224))
    y = np.asarray(draw.watermark_plate("lamp: back", 224))
    assert x.shape != y.shape or not np.array_equal(x, y)
    # Text is actually drawn: the plate is not a flat box.
    assert (a != np.array(draw.PLATE_FILL)).any(axis=2).sum() > 50


@pytest.mark.parametrize("size", [128, 224, 448])
def test_watermarks_fit_and_do_not_collide(size):
    """At every size the widest possible top-left text fits beside the top-right number."""
    from vlmtune.synth.scene import Watermarks
    scene = Scene(size, 0, [], Watermarks({k: 9 for k in KINDS}, "front", 99, 99))
    boxes = draw.watermark_boxes(scene)
    tl, tr = boxes["top_left"][1], boxes["top_right"][1]
    bl = boxes["bottom_left"][1]
    assert tl[2] < tr[0], "top-left plate runs into the top-right plate"
    assert tl[3] < 0.1 * size and bl[1] > 0.9 * size, "plates reach into the object area"
