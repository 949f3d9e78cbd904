"""Held files, the review gallery and a person's sign-off (``fracture-ops deid review``): a file
with a letter-like region inside the body that no engine reads is held (never released), the
gallery shows output pixels only and renders in Chromium without errors, and approving releases
exactly the approved files, bound to the bytes that were reviewed."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from fracture_ops.deid.config import SECRET_ENV, DeidConfig
from fracture_ops.deid.corpus import synthetic_background

SECRET = "review-test-secret-0123456789abcdef01"


def _film(seed: int, body_text: bool) -> bytes:
    """A synthetic film with a name block in the top-left corner and, optionally, a line of
    letters in the middle of the body."""
    img = Image.fromarray(synthetic_background(np.random.default_rng(seed), 700, 800))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=24)
    draw.text((12, 12), f"DOE JANE {seed}", font=font, fill=250)
    draw.text((12, 44), f"MRN {4829170 + seed}", font=font, fill=250)
    if body_text:  # on soft tissue (a plain patch), away from the film's bone texture
        draw.rectangle((288, 318, 480, 372), fill=70)
        draw.text((300, 330), "WXQZ KRTV", font=font, fill=250)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def reviewed_run(tmp_path_factory):
    """A folder-mode run of 4 films, 2 with unread letters in the body (held)."""
    import fracture_ops.deid.pixels as pixels
    from fracture_ops.deid.folder import deidentify_folder

    tmp = tmp_path_factory.mktemp("review")
    src, out = tmp / "in", tmp / "out"
    src.mkdir()
    inputs = {}
    for k in range(4):
        data = _film(k, body_text=k % 2 == 0)
        (src / f"film{k}.png").write_bytes(data)
        inputs[f"film{k}.png"] = data
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(SECRET_ENV, SECRET)
        real_reads = pixels._reads_as_text
        # the recogniser reads the corner block, never the letters inside the body: what an
        # unfamiliar script or a faint, textured region does to it
        mp.setattr(pixels, "_reads_as_text",
                   lambda box, text, *a: real_reads(box, text, *a)
                   and "W" not in text.upper() and "K" not in text.upper())
        summary = deidentify_folder(str(src), str(out), DeidConfig(artifact_root=str(tmp),
                                                                   workers=1))
    return src, out, inputs, summary


def _records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "audit.jsonl").read_text().splitlines() if x]


def test_unread_body_letters_hold_the_file_unreleased(reviewed_run):
    _, out, _, summary = reviewed_run
    records = _records(out)
    held = [r for r in records if r["status"] == "held"]
    assert summary["held"] == 2 and len(held) == 2
    for rec in held:
        assert rec["output"].startswith("held/") and (out / rec["output"]).exists()
        assert rec["pixels"]["held"] >= 1 and "held for review" in rec["reason"]
        assert rec["sha256"] == hashlib.sha256((out / rec["output"]).read_bytes()).hexdigest()
    released = [p for p in (out / "images").glob("*")]
    assert len(released) == 2  # only the films without unread body letters
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["held"] == 2 and len(report["held"]) == 2
    assert report["pixels"]["files_held_for_review"] == 2


def test_gallery_shows_output_pixels_only(reviewed_run):
    from fracture_ops.deid.report import thumbnail

    _, out, inputs, _ = reviewed_run
    page = (out / "gallery.html").read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 4
    decoded = [base64.b64decode(x) for x in images]
    for data in inputs.values():
        pre = thumbnail(data, [], side=480)  # the input drawn exactly as outputs are drawn
        assert pre not in images
        crop = np.asarray(Image.open(io.BytesIO(data)))[8:80, 8:260]  # the name block
        buf = io.BytesIO()
        Image.fromarray(crop).save(buf, format="PNG")
        assert buf.getvalue() not in decoded
    assert page.count('data-cats="all held') == 2
    assert "fracture-ops deid review" in page


def test_review_approves_exactly_the_approved_file(reviewed_run, capsys):
    from fracture_ops.cli import main as cli_main

    _, out, _, _ = reviewed_run
    held = [r for r in _records(out) if r["status"] == "held"]
    first, second = held
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(SECRET_ENV, SECRET)
        assert cli_main(["deid", "review", str(out), "--approve", first["input"][:12],
                         "--reviewer", "privacy-officer"]) == 0
    records = {r["input"]: r for r in _records(out)}
    done, still = records[first["input"]], records[second["input"]]
    assert done["status"] == "stripped" and not done["output"].startswith("held/")
    assert (out / done["output"]).exists() and not (out / first["output"]).exists()
    assert still["status"] == "held" and (out / second["output"]).exists()
    sign_off = [json.loads(x) for x in (out / "review.jsonl").read_text().splitlines()]
    assert len(sign_off) == 1 and sign_off[0]["reviewer"] == "privacy-officer"
    assert sign_off[0]["decision"] == "approved" and sign_off[0]["input"] == first["input"]
    assert sign_off[0]["sha256"] == hashlib.sha256((out / done["output"]).read_bytes()).hexdigest()
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["held"] == 1 and report["counts"]["stripped"] == 3
    assert "privacy-officer" in (out / "gallery.html").read_text()


def test_a_held_file_changed_after_the_run_is_not_released(reviewed_run):
    from fracture_ops.cli import main as cli_main

    _, out, _, _ = reviewed_run
    rec = next(r for r in _records(out) if r["status"] == "held")
    path = out / rec["output"]
    original = path.read_bytes()
    path.write_bytes(original + b"\x00")
    try:
        assert cli_main(["deid", "review", str(out), "--approve", rec["input"][:12]]) == 3
        assert path.exists() and next(r for r in _records(out) if r["input"] == rec["input"])[
            "status"] == "held"
        assert cli_main(["deid", "review", str(out), "--approve", "abc"]) == 2  # too short
    finally:
        path.write_bytes(original)


@pytest.mark.slow
def test_gallery_renders_in_chromium_and_filters(reviewed_run):
    from tests.test_html_render import CHROMIUM, FLAGS

    if not Path(CHROMIUM).exists():
        pytest.skip("chromium not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    _, out, _, _ = reviewed_run
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        tab = browser.new_page()
        errors = []
        tab.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        tab.on("pageerror", lambda e: errors.append(str(e)))
        tab.goto((out / "gallery.html").resolve().as_uri(), wait_until="load")
        total = tab.locator("#cards .card").count()
        tab.get_by_role("button", name=re.compile("^Held for review")).click()
        visible = tab.locator("#cards .card:not(.hide)").count()
        held = sum(r["status"] == "held" for r in _records(out))
        tab.get_by_role("button", name=re.compile("^All")).click()
        again = tab.locator("#cards .card:not(.hide)").count()
        browser.close()
    assert errors == []
    assert total == 4 and visible == held and again == total
