"""Burned-in text scrubbing (fracture_ops.deid.pixels/ocr/scrub): real pseudo-PHI radiographs with
ground-truth boxes, a synthetic corpus drawn here, bit-identity outside the boxes, quarantine when
text remains, and no network access throughout."""

from __future__ import annotations

import io
import json
import re
import socket
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageDraw, ImageFont

from fracture_ops.deid import scrub
from fracture_ops.deid.config import SECRET_ENV, DeidConfig, PixelConfig
from fracture_ops.deid.dicom import deidentify_dicom_bytes, header_phi_values
from fracture_ops.deid.folder import deidentify_folder
from fracture_ops.deid.images import scrub_image_bytes
from fracture_ops.deid.ocr import RapidOcrEngine, _detect_gray, engine_available, get_engine
from fracture_ops.deid.phi_text import (
    contains_phi,
    date_variants,
    normalise,
    phi_tokens_from_values,
)
from fracture_ops.deid.pixels import merge_boxes, widen_continuations
from fracture_ops.deid.profile import DeidKeys
from fracture_ops.errors import ErrorBudgetExceeded

SECRET = "pixel-test-secret-0123456789abcdef"
KEYS = DeidKeys(SECRET.encode())
PIX = PixelConfig()


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Fail any socket to a non-loopback address or any DNS lookup of a remote host."""
    def allowed(host) -> bool:
        return str(host) in ("127.0.0.1", "::1", "localhost", "") or str(host).startswith("127.")

    real_connect, real_gai = socket.socket.connect, socket.getaddrinfo

    def connect(self, address):
        if isinstance(address, tuple) and not allowed(address[0]):
            raise AssertionError(f"network access attempted: {address}")
        return real_connect(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if not allowed(host):
            raise AssertionError(f"DNS lookup attempted: {host}")
        return real_gai(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setenv(SECRET_ENV, SECRET)


def _coverage(boxes, truth_box, shape) -> float:
    mask = np.zeros(shape[:2], bool)
    for x0, y0, x1, y1 in boxes:
        mask[y0:y1, x0:x1] = True
    x0, y0, x1, y1 = truth_box
    return float(mask[y0:y1, x0:x1].mean())


def _blanked_fraction(boxes, shape) -> float:
    mask = np.zeros(shape[:2], bool)
    for x0, y0, x1, y1 in boxes:
        mask[y0:y1, x0:x1] = True
    return float(mask.mean())


# ------------------------------------------------------------------ the pure core

def test_normalise_dates_and_phi_matching():
    assert normalise("D0B: 07/22/1943") == normalise("DOB 07-22-1943")
    assert normalise("07221943") in date_variants("19430722")
    assert normalise("1943 JUL 22") in date_variants("19430722")
    tokens = phi_tokens_from_values(names=["KAUFMAN^SCOTT"], ids=["6774825273"],
                                    dates=["19430722"], texts=["Francis, Todd and Boyer"])
    assert contains_phi("Name:KAUFMANSCOTT", tokens)
    assert contains_phi("PatientID:6774825Z73", tokens)  # one OCR slip in a long id still matches
    assert contains_phi("DOB: 07/22/1943", tokens)
    assert contains_phi("Boyer Medical", tokens)
    assert not contains_phi("PORTABLE", tokens) and not contains_phi("L", tokens)


def test_same_line_boxes_merge_and_wrapped_lines_widen():
    same_line = merge_boxes([(10, 10, 50, 22), (45, 11, 90, 23)])
    assert same_line == [(10, 10, 90, 23)]
    stacked = merge_boxes([(10, 10, 90, 22), (10, 19, 90, 31)])  # lines overlap a little
    assert len(stacked) == 2
    # "Institution Name: Scott Community" / indented "Hospital": the wrapped line is widened
    widened = widen_continuations([(10, 10, 200, 22), (120, 24, 170, 36)])
    assert widened[1] == (120, 24, 200, 36)
    # a value wrapped under its own start (the label kept to its left) is widened too; a line
    # starting left of the one above (by more than a line height) is another line
    assert widen_continuations([(10, 10, 200, 22), (12, 24, 60, 36)])[1] == (12, 24, 200, 36)
    assert widen_continuations([(50, 10, 200, 22), (10, 24, 60, 36)])[1] == (10, 24, 60, 36)


def test_engine_interface_and_site_engine_by_path():
    engine = get_engine("rapidocr")
    assert engine.name == "rapidocr" and engine.version
    img = np.full((200, 400), 30, np.uint8)
    pil = Image.fromarray(img)
    ImageDraw.Draw(pil).text((20, 80), "PATIENT 123456", fill=230,
                             font=ImageFont.load_default(size=28))
    found = engine.detect(np.asarray(pil))
    assert found and any("123456" in (t.text or "") for t in found)
    box, text, score = found[0]
    assert 0 <= box[0] < box[2] <= 400 and 0 <= box[1] < box[3] <= 200 and 0 <= score <= 1
    site = get_engine("fracture_ops.deid.ocr:RapidOcrEngine", target_side=640)
    assert isinstance(site, RapidOcrEngine) and site.target_side == 640
    with pytest.raises(ValueError, match="unknown OCR engine"):
        get_engine("nope")


def test_faster_sessions_find_and_read_exactly_what_rapidocr_own_sessions_do():
    """The engine rebuilds rapidocr's ONNX sessions with the memory arena on (for speed): the
    boxes and the text must be the same as with the sessions rapidocr builds itself."""
    from rapidocr_onnxruntime.utils import OrtInferSession

    pil = Image.new("L", (900, 700), 40)
    draw = ImageDraw.Draw(pil)
    draw.text((30, 40), "DOE^JANE 1987-03-04", fill=235, font=ImageFont.load_default(size=30))
    draw.text((500, 600), "ID 55012", fill=10, font=ImageFont.load_default(size=26))
    img = np.asarray(pil)
    fast = RapidOcrEngine()
    det, rec = fast._models()
    assert det.infer.session.get_session_options().enable_cpu_mem_arena
    boxes, texts = fast.locate(img), fast.read(img, fast.locate(img))
    from rapidocr_onnxruntime.main import DEFAULT_CFG_PATH, read_yaml, update_model_path

    cfg = update_model_path(read_yaml(DEFAULT_CFG_PATH))
    plain = RapidOcrEngine()
    pdet, prec = plain._models()
    one = {"intra_op_num_threads": 1, "inter_op_num_threads": 1}
    pdet.infer = OrtInferSession(dict(cfg["Det"], **one))  # rapidocr's own: arena off
    prec.session = OrtInferSession(dict(cfg["Rec"], **one))
    assert not pdet.infer.session.get_session_options().enable_cpu_mem_arena
    assert boxes and plain.locate(img) == boxes
    # the greyscale detection path feeds the network what rapidocr's own call does
    for view in (img, 255 - img, np.ascontiguousarray(img[:333, :517])):
        quads, _ = pdet(np.stack([view] * 3, axis=-1))
        assert len(quads) and np.array_equal(_detect_gray(det, view), quads)
    assert plain.read(img, boxes) == texts and any("55012" in t for t, _ in texts)


@pytest.mark.skipif(not engine_available("tesseract"), reason="tesseract-ocr is not installed")
def test_tesseract_reads_the_frame_it_is_given():
    pil = Image.new("L", (700, 200), 20)
    ImageDraw.Draw(pil).text((20, 60), "SMITH 40427", fill=240, font=ImageFont.load_default(size=48))
    words = [t.text for t in get_engine("tesseract").detect(np.asarray(pil))]
    assert "40427" in words and "SMITH" in words


def test_verification_rendering_is_computed_only_where_it_is_read():
    from fracture_ops.deid.strokes import z_view, z_view_regions
    from fracture_ops.deid.verify import verification_regions

    rng = np.random.default_rng(5)
    gray = rng.integers(0, 256, (400, 530), dtype=np.uint8)
    regions = verification_regions(gray.shape, 0.1, [(200, 180, 300, 200)])
    full, part = z_view(gray), z_view_regions(gray, regions)
    inside = np.zeros(gray.shape, bool)
    for x0, y0, x1, y1 in regions:
        inside[y0:y1, x0:x1] = True
    assert len(regions) == 5 and np.array_equal(part[inside], full[inside])
    assert (part[~inside] == 255).all() and (full[~inside] == 0).any()


# ------------------------------------------------------------------ real radiographs

def _real_files(realdata: Path) -> list[Path]:
    return sorted((realdata / "dicom" / "dicom_files").glob("*.dcm"))


@pytest.fixture(scope="module")
def real_scrubbed(realdata):
    """Each real DICOM through the whole de-identification: (input, output ds, audit entry)."""
    cfg = DeidConfig(artifact_root="unused")
    out = []
    for path in _real_files(realdata):
        data, result = deidentify_dicom_bytes(path.read_bytes(), KEYS, cfg)
        out.append((path, pydicom.dcmread(io.BytesIO(data)), result.pixels))
    return out


@pytest.mark.realdata
def test_real_dicoms_burned_in_values_are_blanked(real_scrubbed):
    covered, total, misses = 0, 0, []
    for path, res, pixels in real_scrubbed:
        boxes = pixels["boxes"][0]
        truth = json.loads(path.with_suffix(".json").read_text())["annotation"]
        for item in truth:
            value, key = item["value"], item["key"]["text"]
            cov = _coverage(boxes, value["bbox"], res.pixel_array.shape)
            total += 1
            covered += cov >= 0.9
            if cov < 0.9:
                misses.append((key, round(cov, 2)))
            if key in ("Name", "Patient ID", "DOB", "Study Date"):  # identifying: always
                assert cov >= 0.9, f"{key} box only {cov:.2f} blanked in {path.name[:12]}"
        assert pixels["passed"] and res.BurnedInAnnotation == "NO"
        # Measured here: 0.85-8.3% of an image blanked (the most on a 394x552 film with a
        # text block; fused lines are split into rows; since the second round whole lines are
        # blanked, the gaps between words included, and the lines of a block to the block's
        # right edge: text blocks go as rectangles)
        assert _blanked_fraction(boxes, res.pixel_array.shape) < 0.09
    # Measured here: 31 of 32 value boxes (the miss: a two-digit age, 70% covered)
    assert covered / total >= 0.95, (covered, total, misses)


@pytest.mark.realdata
def test_real_files_that_claim_no_burned_in_text_are_scrubbed(real_scrubbed):
    claimed_no = [(p, r, px) for p, r, px in real_scrubbed
                  if pydicom.dcmread(p, stop_before_pixels=True).get("BurnedInAnnotation") == "NO"]
    assert len(claimed_no) == 2
    for _, _, pixels in claimed_no:
        assert pixels["regions"] > 0 and pixels["passed"]


@pytest.mark.realdata
@pytest.mark.skipif(not engine_available("tesseract"), reason="tesseract-ocr is not installed")
def test_second_engine_finds_no_header_value_in_real_outputs(real_scrubbed):
    """Tesseract (independent of the detector) reads the outputs: no header PHI token."""
    from fracture_ops.deid.pixels import to_gray8

    tess = get_engine("tesseract")
    for path, res, _ in real_scrubbed:
        src = pydicom.dcmread(path)
        tokens = phi_tokens_from_values(**header_phi_values(src))
        words = [t.text for t in tess.detect(to_gray8(res.pixel_array))]
        assert not [w for w in words if contains_phi(w, tokens)], path.name[:12]


@pytest.mark.realdata
def test_real_jpeg_previews_are_scrubbed_losslessly(realdata):
    covered = total = 0
    for path in _real_files(realdata):
        jpg = path.with_suffix(".jpg")
        before = np.asarray(Image.open(jpg).convert("L"))
        out, ext, pixels = scrub_image_bytes(jpg.read_bytes(), PIX, {})
        after = np.asarray(Image.open(io.BytesIO(out))).copy()
        assert ext == ".png" and pixels["passed"] and pixels["regions"] > 0
        boxes = pixels["boxes"][0]
        for x0, y0, x1, y1 in boxes:
            after[y0:y1, x0:x1] = before[y0:y1, x0:x1]
        assert (after == before).all()  # outside the boxes: the decoded input, bit for bit
        for item in json.loads(path.with_suffix(".json").read_text())["annotation"]:
            total += 1
            covered += _coverage(boxes, item["value"]["bbox"], before.shape) >= 0.9
    assert covered / total >= 0.9, (covered, total)


# ------------------------------------------------------------------ synthetic corpus

NAMES = ["DOE JANE", "SMITH JOHN", "GARCIA MARIA", "NGUYEN ANH", "MUELLER KARL", "OKAFOR ADA"]


def _radiograph(rng, h=640, w=800) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    img = 60 + 90 * np.exp(-(((xx - w / 2) / (w / 3)) ** 2 + ((yy - h / 2) / (h / 2.5)) ** 2))
    for _ in range(4):  # bone-like bright ellipses
        cx, cy, a, b = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h, \
            rng.uniform(20, 60), rng.uniform(80, 200)
        img += 50 * ((((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2) < 1)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _draw_case(i: int):
    """A synthetic radiograph with PHI text in one style and corner, and a laterality marker."""
    rng = np.random.default_rng(100 + i)
    img = Image.fromarray(_radiograph(rng))
    draw = ImageDraw.Draw(img)
    size = [14, 18, 22, 26][i % 4]
    font = ImageFont.load_default(size=size)
    style = ["bright", "dark", "boxed"][i % 3]
    lines = [NAMES[i % len(NAMES)], f"ID {4829170 + 37 * i}", f"DOB {1950 + i}-0{1 + i % 9}-1{i % 9}"]
    x = 20 if i % 2 == 0 else 800 - 12 * size - 20
    y = 20 if (i // 2) % 2 == 0 else 640 - 4 * (size + 8) - 20
    boxes = []
    for k, line in enumerate(lines):
        pos = (x, y + k * (size + 8))
        box = draw.textbbox(pos, line, font=font)
        if style == "boxed":
            draw.rectangle((box[0] - 3, box[1] - 3, box[2] + 3, box[3] + 3), fill=235)
        draw.text(pos, line, font=font, fill={"bright": 250, "dark": 5, "boxed": 10}[style])
        boxes.append(box)
    marker = "LR"[i % 2]
    mfont = ImageFont.load_default(size=40)
    mpos = (800 - 70, 640 - 80) if y < 300 else (800 - 70, 30)
    if x > 400:
        mpos = (30, mpos[1])
    mbox = draw.textbbox(mpos, marker, font=mfont)
    draw.text(mpos, marker, font=mfont, fill=250)
    return np.asarray(img), lines, boxes, mbox


def test_synthetic_corpus_recall_markers_and_verifier():
    phi_total = phi_hit = markers_kept = 0
    n = 12
    for i in range(n):
        img, lines, boxes, mbox = _draw_case(i)
        frames = img[None].copy()
        result = scrub.scrub_array(frames, PIX, {"names": [lines[0]]})
        assert result.passed
        blanked = result.frames[0].blanked
        for box in boxes:
            phi_total += 1
            phi_hit += _coverage(blanked, box, img.shape) >= 0.9
        markers_kept += _coverage(blanked, mbox, img.shape) < 0.1
        out = frames[0]
        assert not (out[img != out] != img.min()).any()  # only blanking changed pixels
        if engine_available("tesseract"):
            tokens = phi_tokens_from_values(names=[lines[0]], ids=[lines[1][3:]])
            words = [t.text for t in get_engine("tesseract").detect(out)]
            assert not [w for w in words if contains_phi(w, tokens)]
    assert phi_hit / phi_total >= 0.98, (phi_hit, phi_total)
    assert markers_kept / n >= 0.9, (markers_kept, n)


def _labelled_case(size: int = 22):
    """Lines ``<label>: <value>`` (two keep-listed labels, one unknown) on a radiograph."""
    img = Image.fromarray(_radiograph(np.random.default_rng(5)))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=size)
    parts = []
    for k, (label, value) in enumerate([("Patient ID", "4829170"), ("Name", "DOE JANE"),
                                        ("Ward", "SMITH 12")]):
        pos = (30, 30 + k * (size + 10))
        draw.text(pos, f"{label}: {value}", font=font, fill=5)
        full = draw.textbbox(pos, f"{label}: {value}", font=font)
        split = pos[0] + int(draw.textlength(f"{label}:", font=font))
        parts.append(((full[0], full[1], split - 2, full[3]),
                      (split + 4, full[1], full[2], full[3])))
    return np.asarray(img), parts


def test_field_labels_are_kept_and_values_blanked():
    img, parts = _labelled_case()
    phi = {"names": ["DOE JANE"], "ids": ["4829170"]}
    frames = img[None].copy()
    result = scrub.scrub_array(frames, PIX, phi)
    assert result.passed
    blanked = result.frames[0].blanked
    for _label, value in parts:
        assert _coverage(blanked, value, img.shape) >= 0.9
    # keep-listed labels stay readable; a label not on the list goes with its value
    assert _coverage(blanked, parts[0][0], img.shape) < 0.1
    assert _coverage(blanked, parts[1][0], img.shape) < 0.1
    assert _coverage(blanked, parts[2][0], img.shape) >= 0.9
    # with no label keep-list, whole lines are blanked
    frames = img[None].copy()
    whole = scrub.scrub_array(frames, PIX.model_copy(update={"keep_labels": []}), phi)
    assert _coverage(whole.frames[0].blanked, parts[0][0], img.shape) >= 0.9
    assert whole.blanked_fraction > result.blanked_fraction


def test_a_label_crop_that_does_not_read_as_the_label_is_not_kept(monkeypatch):
    """Every cut is confirmed by reading the label's crop alone: an engine that reads a value
    letter in every crop leaves nothing kept, whatever the cut."""
    img, parts = _labelled_case()
    engine, _, _ = scrub.engines_for(PIX)
    real_read = type(engine).read

    def read(self, gray, boxes):
        got = real_read(self, gray, boxes)
        # a crop that reads as a bare label gains a value letter; whole lines read as they are
        return [(re.sub(r"[\s:;]*$", " 4", t) if re.fullmatch(r"[A-Za-z ]+[\s:;]*", t) else t, s)
                for t, s in got]

    monkeypatch.setattr(type(engine), "read", read)
    frames = img[None].copy()
    result = scrub.scrub_array(frames, PIX, {"names": ["DOE JANE"], "ids": ["4829170"]})
    for label, _ in parts:
        assert _coverage(result.frames[0].blanked, label, img.shape) >= 0.9


def test_no_text_nothing_blanked_and_png_untouched():
    rng = np.random.default_rng(7)
    img = _radiograph(rng)
    frames = img[None].copy()
    assert scrub.scrub_array(frames, PIX, {}).regions == 0
    assert (frames[0] == img).all()
    buf = io.BytesIO()
    Image.fromarray(img.astype(np.uint16) * 200, mode=None).save(buf, format="PNG")
    out, ext, pixels = scrub_image_bytes(buf.getvalue(), PIX, {})
    assert ext == ".png" and pixels["regions"] == 0
    assert (np.asarray(Image.open(io.BytesIO(out))) == img.astype(np.uint16) * 200).all()


def test_text_on_16bit_png_is_blanked_bit_identical_elsewhere():
    img, lines, boxes, _ = _draw_case(1)
    img16 = img.astype(np.uint16) * 257
    buf = io.BytesIO()
    Image.fromarray(img16).save(buf, format="PNG")
    out, ext, pixels = scrub_image_bytes(buf.getvalue(), PIX, {"names": [lines[0]]})
    after = np.asarray(Image.open(io.BytesIO(out))).astype(np.uint16)
    assert after.dtype == img16.dtype and pixels["regions"] > 0
    for box in boxes:
        assert _coverage(pixels["boxes"][0], box, img.shape) >= 0.9
    mask = np.zeros(img.shape, bool)
    for x0, y0, x1, y1 in pixels["boxes"][0]:
        mask[y0:y1, x0:x1] = True
    assert (after[~mask] == img16[~mask]).all() and (after[mask] == img16.min()).all()


def _synthetic_text_dicom(tmp_path: Path, name: str, compressed: bool = False) -> Path:
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

    img, lines, _, _ = _draw_case(2)
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = lines[0].replace(" ", "^"), "4829244", "DX"
    ds.Rows, ds.Columns = img.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (img.astype(np.uint16) * 16).tobytes()
    if compressed:
        ds.compress(RLELossless)
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path


def test_compressed_dicom_is_decoded_blanked_and_written_uncompressed(tmp_path):
    path = _synthetic_text_dicom(tmp_path, "rle.dcm", compressed=True)
    src = pydicom.dcmread(path)
    data, result = deidentify_dicom_bytes(path.read_bytes(), KEYS, DeidConfig(artifact_root="x"))
    res = pydicom.dcmread(io.BytesIO(data))
    assert not res.file_meta.TransferSyntaxUID.is_compressed and result.pixels["regions"] > 0
    before, after = src.pixel_array, res.pixel_array.copy()
    for x0, y0, x1, y1 in result.pixels["boxes"][0]:
        after[y0:y1, x0:x1] = before[y0:y1, x0:x1]
    assert (after == before).all()


def test_text_that_cannot_be_removed_is_quarantined(tmp_path, monkeypatch):
    """Force the verification read to keep finding text: the file never reaches the output."""
    import fracture_ops.deid.pixels as pixels_mod

    src = tmp_path / "in"
    src.mkdir()
    _synthetic_text_dicom(src, "a.dcm")
    _synthetic_text_dicom(src, "b.dcm")
    monkeypatch.setattr(pixels_mod, "_residual",
                        lambda gray, *a, **k: [(0, 0, 8, 8)])
    cfg = DeidConfig(artifact_root=str(tmp_path), workers=1, max_bad_fraction=0.5)
    with pytest.raises(ErrorBudgetExceeded):
        deidentify_folder(str(src), str(tmp_path / "out"), cfg)
    out = tmp_path / "out"
    assert not list(out.glob("dicom/**/*.dcm"))
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["quarantined"] == 2
    assert all("burned-in text remains" in q["reason"] for q in report["quarantined"])
    assert report["pixels"]["quarantined_text_remains"] == 2


@pytest.mark.realdata
def test_folder_report_html_shows_outputs_only_and_counts(realdata, tmp_path):
    src = realdata / "dicom" / "dicom_files"
    out = tmp_path / "out"
    summary = deidentify_folder(str(src), str(out), DeidConfig(artifact_root=str(tmp_path),
                                                              workers=2))
    # 7 DICOMs and their 7 JPEG previews (the .json ground truth files are skipped); the one
    # with an implanted device whose printed pattern no engine reads is held for review (it
    # used to be blanked: anatomy lost), as DICOM and as preview
    assert summary["deidentified"] + summary["stripped"] + summary["held"] == 14
    assert summary["held"] <= 2 and summary["quarantined"] == 0
    assert summary["text_regions_blanked"] > 0
    html = (out / "report.html").read_text()
    assert html.count("<img src=\"data:image/png;base64,") == 14
    report = json.loads((out / "report.json").read_text())
    assert report["pixels"]["files_with_text"] == 14
    assert (out / "gallery.html").exists() and len(report["held"]) == summary["held"]
    assert "113101" in report["method_codes"]
    # thumbnails are drawn from outputs: decode one and check the blanked area is uniform
    import base64

    first = html.split('data:image/png;base64,')[1].split('"')[0]
    thumb = np.asarray(Image.open(io.BytesIO(base64.b64decode(first))))
    assert thumb.shape[2] == 3 and max(thumb.shape[:2]) == 480  # shown at 256


def test_every_frame_is_scrubbed_and_icons_and_overlays_removed(tmp_path):
    """A two-frame DICOM with text on each frame, an icon thumbnail and an overlay plane."""
    from pydicom.dataset import Dataset

    path = _synthetic_text_dicom(tmp_path, "multi.dcm")
    ds = pydicom.dcmread(path)
    one = ds.pixel_array
    second = np.asarray(_draw_case(5)[0]).astype(np.uint16) * 16
    ds.NumberOfFrames = 2
    ds.PixelData = np.stack([one, second]).tobytes()
    icon = Dataset()
    icon.Rows, icon.Columns, icon.SamplesPerPixel = 8, 8, 1
    icon.PhotometricInterpretation, icon.BitsAllocated, icon.BitsStored = "MONOCHROME2", 8, 8
    icon.HighBit, icon.PixelRepresentation, icon.PixelData = 7, 0, bytes(64)
    ds.IconImageSequence = [icon]
    ds.add_new(0x60000010, "US", ds.Rows)
    ds.add_new(0x60000011, "US", ds.Columns)
    ds.add_new(0x60003000, "OW", bytes(ds.Rows * ds.Columns // 8))
    ds.save_as(path, enforce_file_format=True)
    data, result = deidentify_dicom_bytes(path.read_bytes(), KEYS, DeidConfig(artifact_root="x"))
    res = pydicom.dcmread(io.BytesIO(data))
    assert "IconImageSequence" not in res and not any(t.group == 0x6000 for t in res.keys())
    boxes = result.pixels["boxes"]
    assert len(boxes) == 2 and boxes[0] and boxes[1] and boxes[0] != boxes[1]
    after = res.pixel_array
    for frame, src in ((0, one), (1, second)):
        restored = after[frame].copy()
        for x0, y0, x1, y1 in boxes[frame]:
            restored[y0:y1, x0:x1] = src[y0:y1, x0:x1]
        assert (restored == src).all()


def test_all_text_policy_blanks_markers_and_audit_names_engines(tmp_path):
    img, lines, _, mbox = _draw_case(3)
    default = scrub.scrub_array(img[None].copy(), PIX, {})
    assert _coverage(default.frames[0].blanked, mbox, img.shape) < 0.1  # "R" kept
    everything = PIX.model_copy(update={"policy": "all-text"})
    result = scrub.scrub_array(img[None].copy(), everything, {})
    assert _coverage(result.frames[0].blanked, mbox, img.shape) >= 0.9
    entry = scrub.scrub_report(result, everything)
    assert entry["policy"] == "all-text" and entry["engines"]["rapidocr"] == "1.4.4"
    assert entry["passed"] and entry["regions"] == len(entry["boxes"][0])
    assert not set(json.dumps(entry)) - set(json.dumps(entry, ensure_ascii=True))
    assert lines[0] not in json.dumps(entry)  # boxes and counts only, never text


def test_task_log_states_the_pixel_totals(tmp_path, caplog):
    import logging

    src = tmp_path / "in"
    src.mkdir()
    _synthetic_text_dicom(src, "a.dcm")
    with caplog.at_level(logging.INFO, logger="fracture_ops.deid"):
        summary = deidentify_folder(str(src), str(tmp_path / "out"),
                                    DeidConfig(artifact_root=str(tmp_path), workers=1))
    assert summary["text_regions_blanked"] >= 1
    assert any("burned-in text: 1 file(s) scrubbed, 1 with text" in r.getMessage()
               for r in caplog.records)
    audit = [json.loads(x) for x in (tmp_path / "out" / "audit.jsonl").read_text().splitlines()]
    assert audit[0]["pixels"]["engines"]["rapidocr"] and audit[0]["pixels"]["policy"] == "default"


def test_cli_pixel_policy_flags(tmp_path, capsys):
    from fracture_ops.cli import main as cli_main

    src = tmp_path / "in"
    src.mkdir()
    path = _synthetic_text_dicom(src, "a.dcm")
    before = pydicom.dcmread(path).pixel_array
    results = {}
    for policy in ("off", "all-text"):
        out = tmp_path / policy
        assert cli_main(["deidentify", str(src), str(out), "--pixel-policy", policy,
                         "--workers", "1"]) == 0
        results[policy] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        after = pydicom.dcmread(next(out.glob("dicom/*/*.dcm"))).pixel_array
        assert (after == before).all() == (policy == "off")
    assert results["off"]["text_regions_blanked"] == 0
    assert results["all-text"]["text_regions_blanked"] >= 3
    with pytest.raises(SystemExit) as exc:  # argparse names the allowed choices
        cli_main(["deidentify", str(src), str(tmp_path / "x"), "--pixel-policy", "bad"])
    assert exc.value.code == 2


@pytest.mark.realdata
def test_header_values_collected_whole_from_real_files(realdata):
    ds = pydicom.dcmread(_real_files(realdata)[0])
    phi = header_phi_values(ds, ["MANIFEST-ID-7"])
    assert str(ds.PatientName) in phi["names"] and all(len(n) > 1 for n in phi["names"])
    assert ds.PatientID in phi["ids"] and "MANIFEST-ID-7" in phi["ids"]
    assert ds.PatientBirthDate in phi["dates"] and ds.InstitutionName in phi["texts"]
    tokens = phi_tokens_from_values(**phi)
    last, first = str(ds.PatientName).split("^")[:2]
    assert contains_phi(f"Name: {last} {first}", tokens)


@pytest.mark.skipif(not engine_available("tesseract"), reason="tesseract-ocr is not installed")
def test_tesseract_thread_limit_stays_out_of_this_process(monkeypatch):
    """OMP_THREAD_LIMIT is for the tesseract child: set in this process it would pin torch's
    OpenMP pool (initialised later) to one thread."""
    monkeypatch.delenv("OMP_THREAD_LIMIT", raising=False)
    img = np.full((120, 400), 20, np.uint8)
    pil = Image.fromarray(img)
    ImageDraw.Draw(pil).text((10, 40), "ID 7361647728", fill=240,
                             font=ImageFont.load_default(size=30))
    words = get_engine("tesseract").detect(np.asarray(pil))
    assert any("7361647728" in w.text for w in words)
    import os

    assert "OMP_THREAD_LIMIT" not in os.environ

