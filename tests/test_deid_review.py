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


def _store_with_held(root: Path, n: int = 2) -> list[str]:
    """A PACS data set in pacs-ingest's layout: study K with one released row and ``n`` held
    instances (records as ``pacs-ingest`` writes them)."""
    import pandas as pd

    from fracture_ops.data.parts import commit_part

    row = {"image_id": "I0", "image_uri": str(root / "images" / "I0.dcm"), "patient_id": "P1",
           "study_id": "K1", "label": None, "view": "AP", "laterality": "L",
           "body_region": "wrist", "source": "pacs", "modality": "DX", "text_regions_blanked": 1}
    (root / "images").mkdir(parents=True)
    (root / "images" / "I0.dcm").write_bytes(b"released")
    commit_part(str(root), "K1", [row], 1 + n)
    ids = [f"I{k}0000000" for k in range(1, n + 1)]
    (root / "held").mkdir()
    (root / "quarantine").mkdir()
    (root / "quarantine" / "K1.json").write_text(json.dumps(
        [{"study_id": "K1", "image_id": i, "reason": "held for review"} for i in ids]))
    for i in ids:
        data = f"held bytes {i}".encode()
        (root / "held" / f"{i}.dcm").write_bytes(data)
        (root / "held" / f"{i}.json").write_text(json.dumps({
            "input": i, "status": "held", "reason": "held for review", "output": f"held/{i}.dcm",
            "sha256": hashlib.sha256(data).hexdigest(), "part": "K1",
            "row": {**row, "image_id": i, "image_uri": str(root / "images" / f"{i}.dcm")}}))
    pd.DataFrame([row]).to_parquet(root / "manifest.parquet")
    return ids


def test_a_review_cut_short_anywhere_is_finished_by_the_same_command(tmp_path, monkeypatch):
    """A crash at each step of an approval leaves a data set the same command completes: the
    image, its one row, no quarantine entry, one record saying approved, no held file."""
    import pandas as pd

    import fracture_ops.deid.review as review_mod
    from fracture_ops import storage

    steps = ["write_bytes", "_mark_quarantine", "write_json", "delete"]
    for step in steps:
        root = tmp_path / step
        (held_id, _) = _store_with_held(root)
        if step.startswith("_"):
            real = getattr(review_mod, step)
            target, name = review_mod, step
        else:
            real = getattr(storage, step)
            target, name = storage, step

        def boom(*a, **k):
            raise OSError("cut short")

        monkeypatch.setattr(target, name, boom)
        with pytest.raises(OSError):
            review_mod.review_store(str(root), [held_id], [], "officer")
        monkeypatch.setattr(target, name, real)
        review_mod.review_store(str(root), [held_id], [], "officer")
        part = pd.read_parquet(root / "parts" / "K1.parquet")
        assert sorted(part["image_id"]) == ["I0", held_id], step
        assert (root / "images" / f"{held_id}.dcm").read_bytes() == f"held bytes {held_id}".encode()
        assert not (root / "held" / f"{held_id}.dcm").exists(), step
        assert json.loads((root / "held" / f"{held_id}.json").read_text())["status"] == "deidentified"
        assert [x["image_id"] for x in json.loads((root / "quarantine" / "K1.json").read_text())] == ["I20000000"]
        assert sorted(pd.read_parquet(root / "manifest.parquet")["image_id"]) == ["I0", held_id]


def test_malformed_held_records_are_refused_not_obeyed(tmp_path):
    from fracture_ops.cli import main as cli_main

    root = tmp_path / "ds"
    first, second = _store_with_held(root)
    record = root / "held" / f"{second}.json"
    good = record.read_text()
    for bad in ("[1, 2]", "{not json", json.dumps({**json.loads(good), "part": "K9"}),
                json.dumps({**json.loads(good), "input": 12345678}),
                good.replace(f'"held/{second}.dcm"', '"held/../../outside.dcm"')):
        record.write_text(bad)
        assert cli_main(["deid", "review", str(root), "--approve", first]) == 3, bad
        assert cli_main(["deid", "review", str(root), "--list"]) == 3
    record.write_text(good)
    assert cli_main(["deid", "review", str(root), "--approve", first]) == 0
