"""The review gallery of a de-identification run (``gallery.html``): what a privacy officer signs.

Every output is shown from its *written* pixels only (never a pre-scrub image), with the blanked
regions outlined in red and the regions held for review in orange; held and quarantined files
are listed with their reasons; a filter bar narrows the view by status or reason; each held file
shows the command that releases it (``fracture-ops deid review OUTPUT --approve ID``) and, once
reviewed, who decided what and when (from the sign-off file ``review.jsonl``). The page is
self-contained (inline images, CSS and a few lines of script; no request leaves the file).
"""

from __future__ import annotations

import html
import json

from fracture_ops import storage

GALLERY = "gallery.html"
THUMBS = "gallery.thumbs.json"  # output-pixel thumbnails, kept for re-rendering after a review
SIGN_OFF = "review.jsonl"

_CATEGORIES = [("all", "All"), ("held", "Held for review"), ("quarantined", "Quarantined"),
               ("blanked", "Text blanked"), ("markers", "Markers kept"), ("clean", "No text found"),
               ("reviewed", "Reviewed")]


def categories(rec: dict) -> list[str]:
    """The filter categories a record belongs to."""
    pixels = rec.get("pixels") or {}
    cats = ["all"]
    if rec["status"] == "held":
        cats.append("held")
    if rec["status"] == "quarantined":
        cats.append("quarantined")
    if pixels.get("regions"):
        cats.append("blanked")
    if pixels.get("kept_markers"):
        cats.append("markers")
    if rec.get("output") and not pixels.get("regions") and rec["status"] != "quarantined":
        cats.append("clean")
    if rec.get("review"):
        cats.append("reviewed")
    return cats


def _card(rec: dict, thumbs: dict[str, str], target: str) -> str:
    e = html.escape
    pixels = rec.get("pixels") or {}
    thumb = thumbs.get(rec.get("output", ""))
    img = (f'<img src="data:image/png;base64,{thumb}" alt="output pixels">' if thumb
           else '<div class="noimg">no image: nothing was written</div>')
    lines = [f'<b class="st-{e(rec["status"])}">{e(rec["status"])}</b> '
             f'<code>{e(rec["input"][:16])}</code>']
    if rec.get("reason"):
        lines.append(e(rec["reason"]))
    if pixels:
        lines.append(f'{pixels.get("regions", 0)} region(s) blanked, '
                     f'{pixels.get("held", 0)} held, {pixels.get("kept_markers", 0)} marker(s) '
                     "kept")
    if rec["status"] == "held":
        lines.append(f'release: <code>fracture-ops deid review {e(target)} --approve '
                     f'{e(rec["input"][:16])}</code>')
    if rec.get("review"):
        r = rec["review"]
        lines.append(f'{e(r["decision"])} by {e(r["reviewer"])} at {e(r["at"])}')
    cats = " ".join(categories(rec))
    return (f'<figure class="card" data-cats="{cats}">{img}<figcaption>'
            + "<br>".join(lines) + "</figcaption></figure>")


def render_gallery(report: dict, records: list[dict], thumbs: dict[str, str],
                   target: str = "OUTPUT") -> str:
    """The gallery page (see the module docstring); ``target``: the folder ``deid review``
    releases held files from (a deidentify output, or a PACS data set's folder)."""
    e = html.escape
    counts = {c: sum(c in categories(r) for r in records) for c, _ in _CATEGORIES}
    buttons = "".join(f'<button type="button" data-filter="{c}">{e(label)} ({counts[c]})'
                      "</button>" for c, label in _CATEGORIES)
    shown = [r for r in records if r["status"] != "skipped"]
    # held and quarantined first: they are what a reviewer must look at
    order = {"held": 0, "quarantined": 1}
    shown.sort(key=lambda r: order.get(r["status"], 2))
    cards = "".join(_card(r, thumbs, target) for r in shown)
    where = ("OUTPUT being this page's folder" if target == "OUTPUT"
             else "in the data set's folder, where held instances wait under <code>held/</code>")
    how = (f"<code>fracture-ops deid review {e(target)} --approve ID [ID ...]</code> ({where}; "
           f"or <code>--reject ID</code>); decisions are appended to <code>{SIGN_OFF}</code>.")
    summary = ", ".join(f"{v} {k}" for k, v in report["counts"].items())
    return f"""<!doctype html><html><head><meta charset="utf-8">
<title>De-identification review gallery</title><style>
body{{font-family:sans-serif;margin:1.5em}} .bar button{{margin:2px;padding:4px 10px}}
.bar button.on{{background:#234;color:#fff}} .card{{display:inline-block;margin:6px;width:330px;
vertical-align:top;font-size:12px}} .card img{{max-width:320px;border:1px solid #888}}
.noimg{{width:320px;height:60px;background:#eee;color:#555;padding:8px;box-sizing:border-box}}
.st-held{{color:#a60}} .st-quarantined{{color:#b00}} .hide{{display:none}}
.legend span{{padding:0 6px;margin-right:8px}}
</style></head><body>
<h1>De-identification review gallery</h1>
<p>Research and education use only, not for clinical use. Every image here is drawn from the
written output pixels, never from an input. <span class="legend"><span style="border:2px solid
#ff2828">blanked</span><span style="border:2px solid #ffa000">held: not blanked, no engine read
it as text</span></span></p>
<p>{e(summary)}.</p>
<p>A held file is not released until a person approves it: {how}</p>
<div class="bar">{buttons}</div>
<div id="cards">{cards}</div>
<script>
document.querySelectorAll('.bar button').forEach(function (b) {{
  b.addEventListener('click', function () {{
    var f = b.getAttribute('data-filter');
    document.querySelectorAll('.bar button').forEach(function (x) {{
      x.classList.toggle('on', x === b); }});
    document.querySelectorAll('#cards .card').forEach(function (c) {{
      c.classList.toggle('hide', c.getAttribute('data-cats').split(' ').indexOf(f) < 0); }});
  }});
}});
</script></body></html>"""


def write_gallery(out_dir: str, report: dict, records: list[dict],
                  thumbs: dict[str, str] | None = None, target: str = "OUTPUT") -> str:
    """Write ``gallery.html`` (and its thumbnails, for re-rendering after a review); its URI."""
    thumbs_uri = storage.join(out_dir, THUMBS)
    if thumbs is None:
        thumbs = json.loads(storage.read_text(thumbs_uri)) if storage.exists(thumbs_uri) else {}
    else:
        storage.write_text(thumbs_uri, json.dumps(thumbs))
    uri = storage.join(out_dir, GALLERY)
    storage.write_text(uri, render_gallery(report, records, thumbs, target))
    return uri
