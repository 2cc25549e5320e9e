"""`vlmtune webui` in a real headless Chromium: page loads, an image is uploaded, the answer appears.

Needs Debian's chromium (/usr/bin/chromium; `.ci/run` installs it) and the playwright package — never
`playwright install`, which downloads browsers. Skipped with the reason when either is missing.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

from helpers import ONE_PER_FAMILY, RULES_PROMPT, SYSTEM, make_dataset, save_image
from serve.servers import free_port, running

CHROMIUM = os.environ.get("VLMTUNE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
LABELS = ["满足要求", "不满足要求"]

# find_spec, not import: importing Gradio here would cost every test run seconds (the server imports it).
if importlib.util.find_spec("gradio") is None:
    pytest.skip("Gradio is not installed (pip install 'vlmtune[webui]')", allow_module_level=True)
if importlib.util.find_spec("playwright") is None:
    pytest.skip("playwright is not installed (pip install playwright)", allow_module_level=True)
if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)


def expected_scores(model_dir: Path, image: Path) -> dict[str, float]:
    from vlmtune.data.conversation import Conversation, Message
    from vlmtune.infer.engine import load_engine
    from vlmtune.infer.scoring import score_conversations

    engine = load_engine(str(model_dir), log=lambda *_: None)
    conversation = Conversation([Message("system", SYSTEM), Message("user", RULES_PROMPT)], images=[str(image)],
                                source="test", index=0)
    return score_conversations(engine.model, engine.processor, [conversation], LABELS)[0]


@pytest.mark.parametrize("arch", ONE_PER_FAMILY)  # the page is generic; every type answers in test_api
def test_webui_answers_an_uploaded_image(family_model_dir, tmp_path):
    tiny_model_dir = family_model_dir  # every end-to-end family
    data = make_dataset(tmp_path / "data", n=6)
    upload = tmp_path / "upload.png"
    save_image(upload, (200, 150), seed=3)
    port = free_port()
    args = ["webui", "--model_name_or_path", str(tiny_model_dir), "--dataset", "my_dataset", "--dataset_dir",
            str(data), "--port", str(port)]
    from playwright import sync_api

    outside: list[str] = []
    with running(args, f"http://127.0.0.1:{port}/", tmp_path / "webui.log"):
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 860})
                page.on("request", lambda r: outside.append(r.url)
                        if not r.url.startswith((f"http://127.0.0.1:{port}", "data:", "blob:")) else None)
                page.goto(f"http://127.0.0.1:{port}/", wait_until="networkidle", timeout=60_000)
                # The prompt box holds the dataset's rules (its first record's user prompt).
                assert page.locator("#vlmtune-prompt textarea").input_value() == RULES_PROMPT
                page.locator("#vlmtune-image input[type=file]").set_input_files(str(upload))
                page.wait_for_selector("#vlmtune-image img", timeout=30_000)  # the upload's preview
                page.click("#vlmtune-run")
                page.wait_for_function(
                    "() => { const t = document.querySelector('#vlmtune-answer textarea');"
                    " return t && t.value.length > 0; }", timeout=60_000)
                answer = page.locator("#vlmtune-answer textarea").input_value()
                scores = page.locator("#vlmtune-scores").inner_text()
                info = page.locator("#vlmtune-info").inner_text()
                page.screenshot(path=str(tmp_path / "webui.png"), full_page=True)
            finally:
                browser.close()
    assert answer in LABELS  # exact: 满足要求 is a substring of 不满足要求
    lines = [line.strip() for line in scores.splitlines() if line.strip()]
    shown = {line: int(after.rstrip("%")) for line, after in zip(lines, lines[1:])
             if line in LABELS and after.endswith("%")}
    assert set(shown) == set(LABELS), scores
    # The page scores what prediction scores: same prompt, system prompt and image handling.
    want = expected_scores(tiny_model_dir, upload)
    for label in LABELS:
        assert abs(shown[label] - 100 * want[label]) <= 0.51, (shown, want)
    assert answer == max(want, key=want.get)
    assert "score mode" in info and "image tokens" in info, info
    assert (tmp_path / "webui.png").stat().st_size > 10_000
    assert not outside, f"the page made outside requests: {outside}"
