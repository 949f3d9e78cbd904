"""Header values to hunt for in burned-in text, and matching OCR output against them.

OCR misreads look-alike characters (O/0, I/l/1, S/5, B/8), drops spaces and punctuation, and
dates are printed in many forms: both sides are normalised the same way before matching.
"""

from __future__ import annotations

import re

_CONFUSABLE = str.maketrans({"O": "0", "Q": "0", "D": "0", "I": "1", "L": "1", "|": "1",
                             "S": "5", "B": "8", "Z": "2", "G": "6"})
_MONTHS = ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"]


def normalise(text: str) -> str:
    """Upper-case alphanumerics only, with look-alike characters folded (O->0, I/L->1, S->5...).

    OCR confuses these pairs; folding both sides lets ``D0B`` match ``DOB``.
    """
    return re.sub(r"[^0-9A-Z]", "", text.upper()).translate(_CONFUSABLE)


def date_variants(value: str) -> set[str]:
    """Ways a DICOM date ``YYYYMMDD`` is commonly printed, normalised (see :func:`normalise`)."""
    m = re.fullmatch(r"\s*(\d{4})\.?(\d{2})\.?(\d{2}).*", str(value))
    if not m:
        return set()
    y, mo, d = m[1], m[2], m[3]
    if not 1 <= int(mo) <= 12:
        return set()
    mon = _MONTHS[int(mo) - 1]
    forms = {y + mo + d, mo + d + y, d + mo + y, y[2:] + mo + d, mo + d + y[2:], d + mo + y[2:],
             y + mon + d, d + mon + y, mon + d + y, y + mon + str(int(d)), str(int(d)) + mon + y,
             mon + str(int(d)) + y}
    return {normalise(f) for f in forms}


def phi_tokens_from_values(names: list[str] = (), ids: list[str] = (), dates: list[str] = (),
                           texts: list[str] = ()) -> set[str]:
    """Normalised tokens to hunt for in the pixels.

    Args:
        names: person names (DICOM ``^`` separated or free text): each part of 3+ characters.
        ids: identifiers (patient id, accession...): the whole value when 3+ characters.
        dates: DICOM DA values: every common printed form (see :func:`date_variants`).
        texts: free text such as an institution name: each word of 4+ characters and the whole.
    """
    tokens: set[str] = set()
    for name in names:
        tokens.update(p for p in (normalise(x) for x in re.split(r"[\^\s,]+", str(name)))
                      if len(p) >= 3)
    for value in ids:
        n = normalise(str(value))
        if len(n) >= 3:
            tokens.add(n)
    for value in dates:
        tokens.update(date_variants(str(value)))
    for text in texts:
        whole = normalise(str(text))
        if len(whole) >= 4:
            tokens.add(whole)
        tokens.update(w for w in (normalise(x) for x in str(text).split()) if len(w) >= 4)
    return tokens


def contains_phi(text: str, tokens: set[str]) -> bool:
    """True when the read text holds one of the tokens (one character may differ for 6+)."""
    norm = normalise(text)
    for tok in tokens:
        if tok in norm:
            return True
        if len(tok) >= 6 and len(norm) >= len(tok):
            for i in range(len(norm) - len(tok) + 1):
                if sum(a != b for a, b in zip(norm[i:i + len(tok)], tok)) <= 1:
                    return True
    return False
