"""Read radiographs (PNG, JPEG, DICOM) into one representation: 2-D float32 in [0, 1], bone bright.

Every reader returns ``(image, ImageMeta)``; every failure raises
:class:`~fracture_ops.errors.ImageDecodeError` naming the file and the cause (missing file, not an
image, corrupt data, unsupported transfer syntax, empty pixel data, too much of a truncated file
missing). Files are read through :mod:`fracture_ops.storage`, so local paths and ``s3://`` URIs work
alike. The format is taken from the file's magic bytes, not from its name.

PNG / JPEG (Pillow): 8- and 16-bit grayscale (modes ``L``, ``I;16``, ``I``) and RGB(A)/palette.
Values are divided by the largest value of the decoded sample type (255 or 2**bit_depth - 1); colour
is reduced to luminance with the ITU-R BT.601 weights (0.299, 0.587, 0.114), the same weights as
Pillow's ``convert("L")``. Pillow reduces 16-bit RGB PNGs to 8 bits per sample when decoding; the
stored bit depth (from the PNG IHDR chunk) is still reported in :attr:`ImageMeta.bit_depth`.

DICOM (pydicom, DICOM PS3.3 C.11 "Look Up Tables and Presentation States"):

1. Modality LUT (Rescale Slope/Intercept or Modality LUT Sequence): ``apply_modality_lut``.
2. VOI: a VOI LUT Sequence is applied with ``apply_voi_lut`` and scaled by its LUT data range; a
   window (Window Center/Width, first pair) with ``apply_voi_lut`` and scaled by the window's
   output range. Real files carry window tags written for 10-14-bit data while their pixels hold
   0..255 in 16-bit storage; honouring such a window gives a near-black image. So a window is used
   only when the 0.5-99.5th percentile range of the values covers at least
   :data:`MIN_WINDOW_COVERAGE` of the window width; otherwise the image is scaled to that
   percentile range instead and a ``window fallback: ...`` warning is recorded. Without any VOI
   tags the same percentile scaling is used (no warning: there is nothing to honour).
3. MONOCHROME1 is inverted after VOI so bone is bright, as in MONOCHROME2.
4. Multi-frame files: the first frame is used (warning). Compressed transfer syntaxes need a
   pydicom decoder plugin; without one the error says which syntax and which plugin is missing.

Truncated JPEGs (policy). Some real files (four FracAtlas images) lose a few bytes at the end, so
the JPEG end-of-image marker is missing and Pillow refuses them. We decode such a file once more
with the marker appended, which lets libjpeg finish the image: the part it never received comes out
as flat mid-gray (all DCT coefficients zero -> 128 in every component). We measure that part as the
trailing run (in raster order) of pixels equal to 128 in every channel. If it is at most
``max_missing_fraction`` of the image (default :data:`DEFAULT_MAX_MISSING_FRACTION`, 10 %) the image
is returned with a ``truncated: ...`` warning in :attr:`ImageMeta.warnings`, which validation copies
into its report; beyond that, :class:`ImageDecodeError` is raised with a cause starting with
``truncated:``. Truncated PNGs and DICOMs are always errors (their decoders cannot resume). The
global ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` switch is never touched: it is process-wide and
would let other threads accept truncated files silently.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fracture_ops import storage
from fracture_ops.errors import ImageDecodeError

DEFAULT_MAX_MISSING_FRACTION = 0.10
MIN_WINDOW_COVERAGE = 0.5
FALLBACK_PERCENTILES = (0.5, 99.5)
LUMA_BT601 = (0.299, 0.587, 0.114)

# Causes that callers (validation) tell apart; ImageDecodeError.cause starts with one of them.
CAUSE_NOT_FOUND = "file not found"
CAUSE_TRUNCATED = "truncated"

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_JPEG_EOI = b"\xff\xd9"
_JPEG_FILL = 128  # libjpeg output of an all-zero block (level shift, PS3 / ITU-T T.81 A.3.1)


@dataclass(frozen=True)
class ImageMeta:
    """What the file says about an image, plus anything the reader had to work around.

    Attributes:
        uri: the file read.
        format: ``png``, ``jpeg`` or ``dicom``.
        width: columns of the image in the file.
        height: rows of the image in the file.
        channels: samples per pixel in the file (1 gray, 3 RGB, 4 RGBA, ...).
        bit_depth: stored bits per sample (PNG IHDR bit depth, 8 for JPEG, DICOM BitsStored).
        photometric: DICOM PhotometricInterpretation, or the Pillow mode (``L``, ``RGB``, ``I;16``).
        warnings: problems worked around, e.g. ``truncated: ...`` or ``window fallback: ...``.
    """

    uri: str
    format: str
    width: int
    height: int
    channels: int
    bit_depth: int
    photometric: str
    warnings: tuple[str, ...] = ()


def read_image(
    uri: str, *, max_missing_fraction: float = DEFAULT_MAX_MISSING_FRACTION,
    max_side: int | None = None,
) -> tuple[np.ndarray, ImageMeta]:
    """Read a PNG, JPEG or DICOM file as a 2-D float32 grayscale image in [0, 1].

    Args:
        uri: local path or ``s3://`` URI.
        max_missing_fraction: largest part of a truncated JPEG that may be missing (filled by the
            decoder) for the image to be kept with a warning.
        max_side: the caller shrinks the image so its longer side is at most this afterwards
            (the model's ``pre_size``). A JPEG is then decoded at 1/2, 1/4 or 1/8 scale in the
            DCT domain (libjpeg's scaled decoding, Pillow's ``draft``), never below ``max_side``
            on the longer side, and straight to luminance (the JPEG's Y channel); this is 3-4x
            faster on multi-megapixel radiographs. Other formats, and JPEGs smaller than twice
            ``max_side``, are decoded in full. The same file and ``max_side`` always give the same
            pixels, so training, evaluation and serving, which all pass their ``pre_size``, see
            identical inputs. A truncated JPEG is decoded in full (its missing part is measured
            as validation measures it).

    Returns:
        ``(image, meta)``: ``image`` has shape ``(height, width)`` (reduced when ``max_side``
        let the decoder scale; ``meta`` keeps the file's own size), dtype float32, bone bright.

    Raises:
        ImageDecodeError: the file is missing, unreadable, not an image, corrupt, uses an
            unsupported DICOM transfer syntax, has no pixel data, or is truncated beyond the limit.
    """
    uri = str(uri)
    data = _read_bytes(uri)
    fmt = sniff_format(data, uri)
    if fmt == "dicom":
        return _decode_dicom(data, uri)
    return _decode_pil(data, uri, fmt, max_missing_fraction, max_side if fmt == "jpeg" else None)


def read_image_size(uri: str) -> tuple[int, int]:
    """Return ``(width, height)`` from the file header, without decoding the pixels.

    Raises:
        ImageDecodeError: the file is missing or its header is not a readable image header.
    """
    uri = str(uri)
    data = _read_bytes(uri)  # S3 has no cheap partial read here; local reads are fast anyway
    fmt = sniff_format(data, uri)
    if fmt == "dicom":
        try:
            ds = dcmread_bytes(data, stop_before_pixels=True)
            return int(ds.Columns), int(ds.Rows)
        except Exception as exc:  # pydicom raises many types for broken headers
            raise ImageDecodeError(uri, f"unreadable DICOM header: {_describe(exc)}") from exc
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:  # lazy: parses the header only
            return im.size
    except Exception as exc:
        raise ImageDecodeError(uri, f"unreadable {fmt} header: {_describe(exc)}") from exc


def to_uint8(img: np.ndarray) -> np.ndarray:
    """Convert a [0, 1] float image to uint8 (rounded, clipped), e.g. for PNG export or hashing."""
    arr = np.asarray(img, dtype=np.float32)
    return np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)


def sniff_format(data: bytes, uri: str = "") -> str:
    """Return ``png``, ``jpeg`` or ``dicom`` from the magic bytes.

    Raises:
        ImageDecodeError: empty file or none of the three formats.
    """
    if not data:
        raise ImageDecodeError(uri, "empty file")
    if data.startswith(_PNG_MAGIC):
        return "png"
    if data.startswith(_JPEG_MAGIC):
        return "jpeg"
    if data[128:132] == b"DICM" or lacks_preamble(data):
        return "dicom"
    if Path(uri).suffix.lower() in (".dcm", ".dicom"):
        raise ImageDecodeError(uri, "not a DICOM file (no 'DICM' marker at byte 128 and no "
                               "DICOM element at byte 0)")
    raise ImageDecodeError(uri, "not a PNG, JPEG or DICOM file")


NO_PREAMBLE = "no 128-byte DICOM preamble (read as a raw DICOM stream)"


def lacks_preamble(data: bytes) -> bool:
    """Whether ``data`` looks like a DICOM stream without the 128-byte preamble and ``DICM``
    marker (older PACS exports, DICOM stored straight from the network): it starts with
    ``DICM`` or with a group 0002/0008 element in explicit or implicit little-endian VR."""
    if data[128:132] == b"DICM":
        return False
    if data[:4] == b"DICM":
        return True
    if len(data) < 8 or data[:2] not in (b"\x02\x00", b"\x08\x00"):
        return False
    vr = data[4:6]
    if vr.isalpha() and vr.isupper():  # explicit VR
        return True
    return 0 < int.from_bytes(data[4:8], "little") < len(data)  # implicit VR: a plausible length


def dcmread_bytes(data: bytes, **kwargs):
    """``pydicom.dcmread`` for a whole file in memory, with or without the preamble.

    A stream without the preamble is read with ``force=True``; when it also lacks the file
    meta group, the transfer syntax it was read with is recorded in ``file_meta`` so the
    pixels decode and the file can be written back. Use :func:`lacks_preamble` to tell.
    """
    import pydicom
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if data[:4] == b"DICM" and data[128:132] != b"DICM":
        data = bytes(128) + data
    raw = data[128:132] != b"DICM"
    ds = pydicom.dcmread(io.BytesIO(data), force=raw, **kwargs)
    if raw and "TransferSyntaxUID" not in ds.file_meta:
        implicit, little = ds.original_encoding
        if implicit is None:
            implicit, little = True, True
        ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                          ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        if "SOPClassUID" in ds:
            ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        if "SOPInstanceUID" in ds:
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _read_bytes(uri: str) -> bytes:
    try:
        return storage.read_bytes(uri)
    except FileNotFoundError as exc:
        raise ImageDecodeError(uri, CAUSE_NOT_FOUND) from exc
    except (IsADirectoryError, PermissionError) as exc:
        raise ImageDecodeError(uri, f"cannot read: {exc.strerror or exc}") from exc
    except Exception as exc:
        # botocore ClientError for a missing key is bad input; other S3 errors (network,
        # credentials) may heal on retry, so they propagate as internal errors.
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
        if code in ("NoSuchKey", "404", "NotFound"):
            raise ImageDecodeError(uri, CAUSE_NOT_FOUND) from exc
        raise


# --------------------------------------------------------------------------- PNG / JPEG (Pillow)

def _decode_pil(data: bytes, uri: str, fmt: str, max_missing: float,
                max_side: int | None = None) -> tuple[np.ndarray, ImageMeta]:
    warnings: list[str] = []
    file_info: dict = {}
    try:
        im = _open_loaded(data, max_side=max_side, file_info=file_info)
    except OSError as exc:
        if fmt != "jpeg" or "truncated" not in str(exc):
            raise ImageDecodeError(uri, f"corrupt {fmt}: {_describe(exc)}") from exc
        # full scale, as validation decodes it, so the missing part is measured the same way
        # and a file validation kept is never refused later (truncated files are rare)
        im = _open_loaded(data + _JPEG_EOI, uri, fmt, file_info=file_info)
        warnings.append(_truncation_warning(np.asarray(im), uri, max_missing))
    except Exception as exc:  # UnidentifiedImageError, SyntaxError (bad CRC), zlib.error, bombs
        raise ImageDecodeError(uri, f"corrupt {fmt}: {_describe(exc)}") from exc
    mode, bands = file_info.get("mode", im.mode), file_info.get("bands", len(im.getbands()))
    width, height = file_info.get("size", im.size)
    bit_depth = _png_bit_depth(data) if fmt == "png" else 8
    img = _pil_to_gray(im, bit_depth)
    if img.size == 0:
        raise ImageDecodeError(uri, "empty pixel data")
    meta = ImageMeta(uri=uri, format=fmt, width=width, height=height, channels=bands,
                     bit_depth=bit_depth, photometric=mode, warnings=tuple(warnings))
    return img, meta


def draft_request(width: int, height: int, max_side: int) -> tuple[int, int] | None:
    """The size to ask Pillow's JPEG ``draft`` for so the decoded longer side stays at least
    ``max_side`` (libjpeg picks the largest 1/2, 1/4, 1/8 reduction that is not smaller than the
    request), or None when the image is not at least twice ``max_side`` (no reduction)."""
    if max_side <= 0 or max(width, height) < 2 * max_side:
        return None
    scale = max_side / max(width, height)
    return max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))


def _open_loaded(data: bytes, uri: str | None = None, fmt: str = "", *,
                 max_side: int | None = None, file_info: dict | None = None):
    """Open and fully decode with Pillow; with ``uri`` set, wrap every failure as ImageDecodeError.
    With ``max_side`` a JPEG is decoded scaled (see :func:`read_image`); ``file_info`` receives the
    file's own size, mode and band count."""
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(data))
        if file_info is not None:
            file_info.update(size=im.size, mode=im.mode, bands=len(im.getbands()))
        request = draft_request(*im.size, max_side) if max_side and im.format == "JPEG" else None
        if request is not None and im.mode in ("L", "RGB", "YCbCr"):
            im.draft("L", request)
        im.load()
        return im
    except Exception as exc:
        if uri is None:
            raise
        raise ImageDecodeError(uri, f"corrupt {fmt}: {_describe(exc)}") from exc


def _describe(exc: Exception) -> str:
    """Exception text without object addresses, so reports are identical across reruns."""
    return f"{type(exc).__name__}: " + re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "<data>", str(exc))


def _truncation_warning(arr: np.ndarray, uri: str, max_missing: float) -> str:
    """Measure the decoder-filled tail of a truncated JPEG; raise when too much is missing."""
    fill = arr == _JPEG_FILL
    if fill.ndim == 3:
        fill = fill.all(axis=-1)
    flat = fill.ravel()
    real = np.flatnonzero(~flat)
    missing_px = flat.size - (int(real[-1]) + 1 if real.size else 0)
    fraction = missing_px / max(flat.size, 1)
    rows = missing_px // max(arr.shape[1], 1)
    text = (f"{CAUSE_TRUNCATED}: JPEG ends before its end-of-image marker; {fraction:.1%} of the "
            f"pixels (about {rows} bottom rows) are missing and filled with flat gray")
    if fraction > max_missing:
        raise ImageDecodeError(uri, f"{text} (limit {max_missing:.0%})")
    return text


def _png_bit_depth(data: bytes) -> int:
    # IHDR is always the first chunk: 8-byte signature, length, type, width, height, bit depth.
    return int(data[24]) if len(data) > 24 else 8


def _pil_to_gray(im, bit_depth: int) -> np.ndarray:
    """Pillow image -> float32 [0, 1] luminance."""
    mode = im.mode
    if mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
        im, mode = im.convert("RGB"), "RGB"
    arr = np.asarray(im)
    if mode == "1":
        return arr.astype(np.float32)
    if mode.startswith("I"):  # I;16, I;16B, I (16-bit PNG as int32)
        scale = float(2 ** min(bit_depth, 16) - 1) if bit_depth > 8 else 65535.0
        return np.clip(arr.astype(np.float32) / scale, 0.0, 1.0)
    if mode == "F":
        return np.clip(arr.astype(np.float32), 0.0, 1.0)
    scale = float(np.iinfo(arr.dtype).max)
    if arr.ndim == 3:
        if arr.shape[-1] >= 3:
            arr = np.tensordot(arr[..., :3].astype(np.float32), np.float32(LUMA_BT601), axes=1)
        else:  # LA: gray + alpha, keep the gray
            arr = arr[..., 0]
    return (arr.astype(np.float32) / scale).astype(np.float32)


# --------------------------------------------------------------------------- DICOM (pydicom)

def _decode_dicom(data: bytes, uri: str) -> tuple[np.ndarray, ImageMeta]:
    try:
        ds = dcmread_bytes(data)
    except Exception as exc:  # InvalidDicomError, EOFError, struct errors on broken headers
        raise ImageDecodeError(uri, f"corrupt DICOM header: {_describe(exc)}") from exc
    arr = _dicom_pixels(ds, uri)
    warnings: list[str] = [NO_PREAMBLE] if lacks_preamble(data) else []
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        arr = arr[0]
        warnings.append(f"multi-frame: used frame 1 of {frames}")
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)) or 8)
    if spp > 1:  # colour DICOM: pydicom has converted YBR to RGB already
        img = np.tensordot(arr[..., :3].astype(np.float32), np.float32(LUMA_BT601), axes=1)
        img = np.clip(img / float(2**bits - 1), 0.0, 1.0)
    else:
        img = _dicom_gray(arr, ds, warnings)
        if photometric == "MONOCHROME1":
            img = 1.0 - img
    meta = ImageMeta(uri=uri, format="dicom", width=int(ds.Columns), height=int(ds.Rows),
                     channels=spp, bit_depth=bits, photometric=photometric,
                     warnings=tuple(warnings))
    return img.astype(np.float32), meta


def _dicom_pixels(ds, uri: str) -> np.ndarray:
    """Decode the pixel data, naming the transfer syntax when no decoder can handle it."""
    from pydicom.pixels import get_decoder

    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ImageDecodeError(uri, "no pixel data")
    ts = ds.file_meta.get("TransferSyntaxUID")
    if ts is not None:
        try:
            decoder = get_decoder(ts)
        except NotImplementedError as exc:
            raise ImageDecodeError(uri, f"unsupported transfer syntax {ts.name} ({ts}): no decoder exists") from exc
        if not decoder.is_available:
            missing = "; ".join(decoder.missing_dependencies)
            raise ImageDecodeError(uri, f"unsupported transfer syntax {ts.name} ({ts}): no "
                                        f"decoder plugin installed ({missing})")
    try:
        arr = ds.pixel_array
    except Exception as exc:  # ValueError (short data), RuntimeError (plugin failed), ...
        raise ImageDecodeError(uri, f"corrupt or truncated pixel data: {exc}") from exc
    if arr.size == 0:
        raise ImageDecodeError(uri, "empty pixel data")
    return arr


def _dicom_gray(arr: np.ndarray, ds, warnings: list[str]) -> np.ndarray:
    """Modality LUT, then VOI LUT / window (or percentile scaling), to [0, 1]."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(arr, ds).astype(np.float64)
    lo, hi = _value_range(values)
    voi_seq = ds.get("VOILUTSequence")
    if voi_seq:
        # LUT inputs are integers (PS3.3 C.11.2.1.1); modality output may be float-typed.
        out = apply_voi_lut(np.rint(values).astype(np.int64), ds, index=0, prefer_lut=True)
        # Descriptors often overstate the output bits; the LUT's own entries give its real range.
        # Pass every LUT input through pydicom (which knows the LUTData encodings) to get them.
        n_entries, first = int(voi_seq[0].LUTDescriptor[0]) or 65536, int(voi_seq[0].LUTDescriptor[1])
        lut = apply_voi_lut(np.arange(first, first + n_entries, dtype=np.int64), ds, index=0)
        return _scale(out.astype(np.float64), float(lut.min()), float(lut.max()))
    window = _first_window(ds)
    if window is None:
        return _scale(values, lo, hi)
    center, width = window
    w_lo, w_hi = center - width / 2.0, center + width / 2.0
    coverage = max(0.0, min(hi, w_hi) - max(lo, w_lo)) / width if width > 0 else 0.0
    if coverage < MIN_WINDOW_COVERAGE:
        warnings.append(
            f"window fallback: window center/width {center:g}/{width:g} covers only "
            f"{coverage:.0%} of the values' {FALLBACK_PERCENTILES[0]}-{FALLBACK_PERCENTILES[1]}th "
            f"percentile range {lo:g}..{hi:g}; scaled to that range instead")
        return _scale(values, lo, hi)
    out = apply_voi_lut(values, ds, index=0, prefer_lut=False).astype(np.float64)
    # The window's output range depends on BitsStored/rescale (PS3.3 C.11.2.1.2); ask pydicom
    # for it by windowing two far-out probe values instead of re-deriving the rule here.
    probe = np.array([w_lo - 10 * width - 1, w_hi + 10 * width + 1], dtype=np.float64)
    y_min, y_max = apply_voi_lut(probe, ds, index=0, prefer_lut=False).astype(np.float64)
    return _scale(out, float(y_min), float(y_max))


def _first_window(ds) -> tuple[float, float] | None:
    """The first Window Center/Width pair (the tags may hold several), or None."""
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None:
        return None
    try:
        return (float(np.atleast_1d(np.asarray(center, dtype=np.float64))[0]),
                float(np.atleast_1d(np.asarray(width, dtype=np.float64))[0]))
    except (TypeError, ValueError, IndexError):
        return None


def _value_range(values: np.ndarray) -> tuple[float, float]:
    """Robust display range: 0.5-99.5th percentiles, min/max when those coincide."""
    lo, hi = (float(v) for v in np.percentile(values, FALLBACK_PERCENTILES))
    if hi <= lo:
        lo, hi = float(values.min()), float(values.max())
    return lo, hi


def _scale(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:  # constant image: all zeros (validation flags it as blank)
        return np.zeros(values.shape, dtype=np.float32)
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


__all__ = [
    "CAUSE_NOT_FOUND",
    "CAUSE_TRUNCATED",
    "DEFAULT_MAX_MISSING_FRACTION",
    "ImageMeta",
    "read_image",
    "read_image_size",
    "sniff_format",
    "to_uint8",
]
