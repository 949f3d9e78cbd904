"""De-identification of PNG/JPEG inputs: metadata dropped losslessly, pixels byte-identical.

PNG keeps only its critical chunks (IHDR, PLTE, IDAT, IEND) and the transparency/colour chunks a
decoder needs; JPEG keeps only the segments that decode the image (no APPn/COM: no EXIF, XMP,
ICC notes or comments). Burned-in text is scrubbed by :func:`scrub_image_bytes`.
"""

from __future__ import annotations

import io

from fracture_ops.errors import FileRejected


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_KEEP = {b"IHDR", b"PLTE", b"IDAT", b"IEND", b"tRNS", b"gAMA", b"cHRM", b"sRGB", b"sBIT",
             b"pHYs", b"bKGD"}  # drops tEXt/zTXt/iTXt/eXIf/tIME/iCCP and unknown chunks


def strip_png(data: bytes) -> bytes:
    """Keep only the chunks that define the pixels; raise ValueError when malformed."""
    out, i = [PNG_SIGNATURE], len(PNG_SIGNATURE)
    while i + 12 <= len(data):
        length, ctype = int.from_bytes(data[i:i + 4], "big"), data[i + 4:i + 8]
        end = i + 12 + length
        if end > len(data):
            break
        if ctype in _PNG_KEEP:
            out.append(data[i:end])
        if ctype == b"IEND":
            return b"".join(out)
        i = end
    raise ValueError("truncated PNG")


def _jpeg_scan_end(data: bytes, j: int) -> int:
    """Index of the first marker after entropy-coded data starting at ``j``."""
    n = len(data)
    while j < n - 1:
        if data[j] == 0xFF and data[j + 1] != 0x00 and not 0xD0 <= data[j + 1] <= 0xD7 \
                and data[j + 1] != 0xFF:
            return j
        j += 1
    return n


def strip_jpeg(data: bytes) -> bytes:
    """Drop APP1-APP13/APP15 (EXIF, XMP, ICC, IPTC...) and COM segments; keep a bare JFIF APP0.

    The compressed scans are copied as they are, so decoded pixels do not change.
    """
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG")
    out, i, n = [b"\xff\xd8"], 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise ValueError("corrupt JPEG marker stream")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xD9:
            break
        length = int.from_bytes(data[i + 2:i + 4], "big")
        segment = data[i:i + 2 + length]
        if marker == 0xE0 and segment[4:9] == b"JFIF\x00":
            out.append(b"\xff\xe0\x00\x10" + segment[4:16] + b"\x00\x00")  # no thumbnail
        elif marker == 0xEE or not (0xE0 <= marker <= 0xEF or marker == 0xFE):
            out.append(segment)  # tables, frame/scan headers, Adobe APP14 (colour transform)
        i += 2 + length
        if marker == 0xDA:  # entropy-coded data follows the scan header
            end = _jpeg_scan_end(data, i)
            out.append(data[i:end])
            i = end
    out.append(b"\xff\xd9")
    return b"".join(out)


def strip_image_metadata(data: bytes) -> tuple[bytes, str]:
    """Strip PNG/JPEG metadata; return the new bytes and the file extension.

    Raises:
        FileRejected: not a PNG/JPEG, or the stripped image does not decode.
    """
    from PIL import Image

    try:
        if data.startswith(PNG_SIGNATURE):
            out, ext = strip_png(data), ".png"
        else:
            out, ext = strip_jpeg(data), ".jpg"
        with Image.open(io.BytesIO(out)) as img:
            img.load()
    except Exception as exc:
        raise FileRejected(f"image does not decode: {type(exc).__name__}") from exc
    return out, ext


def _png_bytes(arr) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")  # uint16 -> I;16, uint8 -> L/RGB, int32 -> I
    return buf.getvalue()


def scrub_image_bytes(data: bytes, pixcfg, phi: dict[str, list[str]]) -> tuple[bytes, str, dict]:
    """Strip metadata, then scrub burned-in text from a PNG/JPEG.

    Nothing blanked: the stripped bytes are returned as they are. Something blanked: the decoded
    pixels, blanked, are written as PNG (lossless), so every pixel outside the boxes keeps the
    decoded input's value (a JPEG is not re-compressed).

    Returns:
        (bytes, extension, the scrub's audit entry).

    Raises:
        FileRejected: not a PNG/JPEG or does not decode.
        PixelTextRemains: text remains after the last round.
    """
    import numpy as np
    from PIL import Image

    from fracture_ops.deid.scrub import scrub_array, scrub_report

    out, ext = strip_image_metadata(data)
    with Image.open(io.BytesIO(out)) as img:
        mode = img.mode
        if mode not in ("L", "I;16", "RGB", "I", "LA", "RGBA", "P", "1", "CMYK"):
            raise FileRejected(f"image mode {mode} is not supported")
        if mode in ("P", "1", "CMYK", "LA", "RGBA"):
            img = img.convert("RGB" if mode != "LA" else "L")
            mode = img.mode
        frames = np.array(img)[None]
    result = scrub_array(frames, pixcfg, phi)
    if result.regions:
        out, ext = _png_bytes(frames[0]), ".png"
    return out, ext, scrub_report(result, pixcfg)
