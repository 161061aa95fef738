"""The `cdiff eval` report: `report.json` (everything) and a self-contained `report.html`.

The HTML page needs nothing else: thumbnails are inlined as base64 PNG data URIs, the trade-off plot
(text alignment against image alignment, as in the paper's figure) is inline SVG, and there is no
script. It opens from a file, a mail attachment or a CI artifact alike.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

from PIL import Image

THUMB = 128
PAPER_NOTE = (
    "For scale, the paper reports (200 DDPM steps, guidance 6, CLIP ViT-B/32, DINO ViT-S/16, CustomConcept101 prompts; "
    "Kumari et al., CVPR 2023, Table 1/2) text / CLIP image / DINO image alignment: single concept: "
    "Textual Inversion .613/.752/.511, DreamBooth .752/.752/.553, Custom Diffusion .760/.744/.531; "
    "two concepts: Custom Diffusion merge .763/.658/.365, joint .757/.668/.376, DreamBooth .738/.663/.382."
)


def esc(x) -> str:
    return html.escape(str(x), quote=True)


def fmt(x, nd: int = 3, signed: bool = False) -> str:
    if x is None:
        return "–"
    x = x if round(x, nd) != 0 else 0.0  # no "-0.000"
    return f"{x:+.{nd}f}" if signed else f"{x:.{nd}f}"


def thumbnail_uri(path: str | Path, size: int = THUMB, _cache: dict | None = None) -> str:
    """A PNG data URI of the image scaled down to fit size x size."""
    if _cache is not None and str(path) in _cache:
        return _cache[str(path)]
    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((size, size), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, format="PNG", optimize=True)
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    if _cache is not None:
        _cache[str(path)] = uri
    return uri


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (steps of 1, 2 or 5 x 10^k) covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1e-3
    raw = (hi - lo) / max(count, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step - 1e-9) * step
    ticks = []
    t = start
    while t <= hi + 1e-9:
        ticks.append(round(t, 10))
        t += step
    return ticks


def plot_points(run: dict) -> list[dict]:
    """The trade-off plot's points: one per entry (with `base_x`/`base_y`, its own prompts on the base
    model) and one per base model (its baselines averaged over the entries evaluated on it, as the
    paper averages over concepts). Points without an image alignment are left out."""
    pts = []
    bases: dict[str, list[dict]] = {}
    for r in run["entries"]:
        b = r.get("baseline", {})
        has_base = b.get("image_alignment") is not None and b.get("text_alignment") is not None
        if r.get("image_alignment") is not None and r.get("text_alignment") is not None:
            pts.append({"label": r["name"], "x": r["text_alignment"], "y": r["image_alignment"], "kind": "entry",
                        "base_x": b["text_alignment"] if has_base else None, "base_y": b["image_alignment"] if has_base else None})
        if has_base:
            bases.setdefault(r["base"], []).append(b)
    for i, (ref, bs) in enumerate(bases.items()):
        label = "base" if len(bases) == 1 else f"base {i + 1}: {Path(ref).name or ref}"
        pts.append({"label": label, "x": sum(b["text_alignment"] for b in bs) / len(bs),
                    "y": sum(b["image_alignment"] for b in bs) / len(bs), "kind": "base"})
    return pts


def _place_labels(wanted: list[tuple[float, float, str, str]], height: float) -> list[float]:
    """Label y positions nudged so that labels (x, y, anchor, text) do not overlap (greedy, 13 px lines)."""
    placed: list[tuple[float, float, float]] = []  # x0, x1, y
    out = []
    for x, y, anchor, text in wanted:
        w = 7.0 * len(text)
        x0, x1 = (x - w, x) if anchor == "end" else (x, x + w)
        ly = y
        for step in range(40):
            ly = y + (step // 2 + 1) * 13 * (1 if step % 2 else -1) if step else y
            if 12 <= ly <= height - 4 and not any(a < x1 and x0 < b and abs(ly - c) < 13 for a, b, c in placed):
                break
        placed.append((x0, x1, ly))
        out.append(ly)
    return out


def tradeoff_svg(points: list[dict], width: int = 560, height: int = 400) -> str:
    """Inline SVG scatter: text alignment (x) against image alignment (y), labelled points."""
    ml, mr, mt, mb = 64, 24, 20, 52
    pw, ph = width - ml - mr, height - mt - mb
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="Text alignment against image alignment">',
             f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#999"/>']
    if not points:
        parts.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" fill="#666">'
                     "no image alignment to plot (no training images)</text></svg>")
        return "".join(parts)
    xs = [p["x"] for p in points] + [p["base_x"] for p in points if p.get("base_x") is not None]
    ys = [p["y"] for p in points] + [p["base_y"] for p in points if p.get("base_y") is not None]

    def span(v):
        lo, hi = min(v), max(v)
        pad = max((hi - lo) * 0.15, 0.02)
        return lo - pad, hi + pad

    (x0, x1), (y0, y1) = span(xs), span(ys)

    def sx(x):
        return ml + (x - x0) / (x1 - x0) * pw

    def sy(y):
        return mt + ph - (y - y0) / (y1 - y0) * ph

    for t in nice_ticks(x0, x1):
        if x0 <= t <= x1:
            parts.append(f'<line x1="{sx(t):.1f}" y1="{mt}" x2="{sx(t):.1f}" y2="{mt + ph}" stroke="#e3e3e3"/>')
            parts.append(f'<text x="{sx(t):.1f}" y="{mt + ph + 16}" text-anchor="middle" class="tick">{t:g}</text>')
    for t in nice_ticks(y0, y1):
        if y0 <= t <= y1:
            parts.append(f'<line x1="{ml}" y1="{sy(t):.1f}" x2="{ml + pw}" y2="{sy(t):.1f}" stroke="#e3e3e3"/>')
            parts.append(f'<text x="{ml - 6}" y="{sy(t) + 4:.1f}" text-anchor="end" class="tick">{t:g}</text>')
    parts.append(f'<text x="{ml + pw / 2}" y="{height - 12}" text-anchor="middle" class="axis">'
                 "text alignment (CLIPScore) →</text>")
    parts.append(f'<text x="16" y="{mt + ph / 2}" text-anchor="middle" class="axis" '
                 f'transform="rotate(-90 16 {mt + ph / 2})">image alignment (CLIP) →</text>')
    for p in points:  # a dashed line from each entry to its own prompts on the base model
        if p["kind"] == "entry" and p.get("base_x") is not None:
            parts.append(f'<line x1="{sx(p["base_x"]):.1f}" y1="{sy(p["base_y"]):.1f}" x2="{sx(p["x"]):.1f}" '
                         f'y2="{sy(p["y"]):.1f}" stroke="#9ab" stroke-dasharray="4 3"/>')
            parts.append(f'<circle cx="{sx(p["base_x"]):.1f}" cy="{sy(p["base_y"]):.1f}" r="3" fill="none" stroke="#999"/>')
    wanted = []
    for p in points:
        x, y = sx(p["x"]), sy(p["y"])
        anchor = "end" if x > ml + pw * 0.7 else "start"
        dx = -9 if anchor == "end" else 9
        wanted.append((x + dx, y + 18 if p["kind"] == "base" else y - 8, anchor, p["label"]))
    label_y = _place_labels(wanted, height)
    for p, (lx, _, anchor, text), ly in zip(points, wanted, label_y):
        x, y = sx(p["x"]), sy(p["y"])
        title = f"<title>{esc(p['label'])}: text {p['x']:.3f}, image {p['y']:.3f}</title>"
        if p["kind"] == "base":
            parts.append(f'<rect class="pt base" x="{x - 5:.1f}" y="{y - 5:.1f}" width="10" height="10" fill="#777">{title}</rect>')
        else:
            parts.append(f'<circle class="pt entry" cx="{x:.1f}" cy="{y:.1f}" r="6" fill="#2a6fdb">{title}</circle>')
        parts.append(f'<text x="{lx:.1f}" y="{ly:.1f}" text-anchor="{anchor}" class="label">{esc(text)}</text>')
    parts.append("</svg>")
    return "".join(parts)


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:1.5em;margin:0 0 4px} h2{font-size:1.25em;margin:28px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:1.05em;margin:18px 0 6px} .meta{color:#555;font-size:.9em}
table{border-collapse:collapse;margin:8px 0;font-size:.92em} th,td{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3} td.num{text-align:right;font-variant-numeric:tabular-nums} tr.base td{color:#666;font-style:italic}
.pos{color:#17803d}.neg{color:#b3261e} .thumbs img{width:96px;height:96px;object-fit:cover;margin:1px;border:1px solid #ccc}
.samples td{padding:4px} .note{background:#fff8e1;border-left:3px solid #f0b400;padding:4px 8px;margin:4px 0;font-size:.9em}
.small{font-size:.85em;color:#555} svg .tick{font-size:11px;fill:#555} svg .axis{font-size:12px;fill:#333} svg .label{font-size:12px;fill:#111}
.flex{display:flex;gap:32px;flex-wrap:wrap;align-items:flex-start} img.grid{max-width:100%;border:1px solid #ccc}
"""


def _delta_cell(x) -> str:
    cls = "" if x is None or round(x, 3) == 0 else ("pos" if x > 0 else "neg")
    return f'<td class="num {cls}">{fmt(x, signed=True)}</td>'


def _grid_uri(path: str) -> str:
    """The training-samples grid, whole (a thumbnail would shrink its cells to nothing)."""
    try:
        return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")
    except OSError:
        return ""


def _imgs(paths, cache) -> str:
    return "".join(f'<img src="{thumbnail_uri(p, _cache=cache)}" alt="{esc(Path(p).name)}">' for p in paths)


def scores_table(run: dict) -> str:
    dino = any(r.get("image_alignment_dino") is not None for r in run["entries"])
    head = ["entry", "kind", "tokens", "text alignment", "image alignment (CLIP)"] + (["image alignment (DINO)"] if dino else []) + \
           ["KID ×1000", "Δ text", "Δ image (CLIP)"] + (["Δ image (DINO)"] if dino else [])
    rows = ["<table class=\"scores\"><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for r in run["entries"]:
        cells = [esc(r["name"]), esc(r["kind"]), esc(" ".join(r["tokens"]))]
        row = "".join(f"<td>{c}</td>" for c in cells)
        row += f'<td class="num">{fmt(r["text_alignment"])}</td><td class="num">{fmt(r["image_alignment"])}</td>'
        if dino:
            row += f'<td class="num">{fmt(r["image_alignment_dino"])}</td>'
        row += f'<td class="num">{fmt(r["kid"], 2)}</td>' + _delta_cell(r["delta"]["text_alignment"])
        row += _delta_cell(r["delta"]["image_alignment"]) + (_delta_cell(r["delta"]["image_alignment_dino"]) if dino else "")
        rows.append(f"<tr>{row}</tr>")
        b = r["baseline"]
        brow = f'<td>base model, same prompts without {esc(" ".join(r["tokens"]))}</td><td></td><td></td>'
        brow += f'<td class="num">{fmt(b["text_alignment"])}</td><td class="num">{fmt(b["image_alignment"])}</td>'
        if dino:
            brow += f'<td class="num">{fmt(b["image_alignment_dino"])}</td>'
        brow += "<td></td><td></td><td></td>" + ("<td></td>" if dino else "")
        rows.append(f'<tr class="base">{brow}</tr>')
    rows.append("</tbody></table>")
    return "".join(rows)


_ATTRIBUTES = ("concept", "kind", "colour", "fill", "size", "position", "relation", "background", "plain_object", "count")


def world_section(w: dict | None) -> str:
    """The nano-world oracle's reading of the samples: sentences, then shares per attribute."""
    if not w:
        return ""
    out = ["<h3>What the pictures show (nano-world oracle)</h3><ul class=\"world\">"]
    out += [f"<li>{esc(line)}</li>" for line in w["sentences"]]
    out.append("</ul>")
    rows = [("concept model, its prompts", w["following"]), ("base model, same prompts without the tokens", w["baseline_following"]),
            ("concept model, ordinary captions", w["ordinary"]), ("base model, ordinary captions", w["baseline_ordinary"])]
    keys = [k for k in _ATTRIBUTES if any(k in d for _, d in rows)]
    out.append("<table><thead><tr><th>share of images right</th>" + "".join(f"<th>{esc(k.replace('_', ' '))}</th>" for k in keys)
               + "</tr></thead><tbody>")
    for label, d in rows:
        cells = "".join(f'<td class="num">{"–" if k not in d else f"{100 * d[k]:.0f} %"}</td>' for k in keys)
        out.append(f"<tr><td>{esc(label)}</td>{cells}</tr>")
    out.append("</tbody></table><p class=\"small\">The oracle reads each image's objects (kind, colour, fill, size, "
               "position) and background by colour segmentation and shape templates (cdiff_cli/world/oracle.py); a concept's "
               "look is what it reads in the concept's training images. \"plain object\": the prompt's other objects.</p>")
    return "".join(out)


def entry_section(r: dict, cache: dict) -> str:
    out = [f'<section class="entry" id="entry-{esc(r["name"])}"><h2>{esc(r["name"])}</h2>',
           f'<div class="meta">{esc(r["kind"])} · tokens {esc(" ".join(r["tokens"]))} · classes {esc(", ".join(r["classes"]))}'
           f' · prompts: {esc(r["prompt_set"])} ({len(r["prompts"])}) · {r["seconds"]} s</div>']
    out += [f'<div class="note">{esc(n)}</div>' for n in r.get("notes", [])]
    dino = any(c.get("image_alignment_dino") is not None for c in r["per_concept"])
    out.append("<h3>Per concept</h3><table><thead><tr><th>token</th><th>class</th><th>training images</th>"
               "<th>image alignment (CLIP)</th><th>base</th>"
               + ("<th>image alignment (DINO)</th><th>base</th>" if dino else "") + "</tr></thead><tbody>")
    for c in r["per_concept"]:
        out.append(f'<tr><td>{esc(c["token"])}</td><td>{esc(c["class"])}</td><td class="thumbs">{_imgs(c["training_images"], cache) or "none"}</td>'
                   f'<td class="num">{fmt(c["image_alignment"])}</td><td class="num">{fmt(c["baseline_image_alignment"])}</td>'
                   + (f'<td class="num">{fmt(c["image_alignment_dino"])}</td><td class="num">{fmt(c["baseline_image_alignment_dino"])}</td>'
                      if dino else "") + "</tr>")
    out.append("</tbody></table>")
    out.append('<h3>Samples</h3><table class="samples"><thead><tr><th>prompt (scored without the token)</th><th>kind</th>'
               "<th>text alignment</th><th>concept model</th><th>base model</th></tr></thead><tbody>")
    for p in r["prompts"]:
        out.append(f'<tr><td>{esc(p["prompt"])}<div class="small">{esc(p["text"])}</div></td><td>{esc(p["kind"])}</td>'
                   f'<td class="num">{fmt(p["text_alignment"])}<div class="small">base {fmt(p["baseline_text_alignment"])}</div></td>'
                   f'<td class="thumbs">{_imgs(p["images"], cache)}</td><td class="thumbs">{_imgs(p["baseline_images"], cache)}</td></tr>')
    out.append("</tbody></table>")
    out.append(world_section(r.get("world")))
    if r.get("training_samples"):
        out.append(f'<h3>Samples made at the end of training</h3><img class="grid" alt="samples" '
                   f'src="{_grid_uri(r["training_samples"])}">')
    f = r.get("forgetting", {})
    if f.get("classes"):
        out.append("<h3>Forgetting</h3><table class=\"samples\"><thead><tr><th>class prompt</th><th>KID ×1000</th>"
                   "<th>concept model</th><th>base model</th></tr></thead><tbody>")
        for c in f["classes"]:
            out.append(f'<tr><td>{esc(c["prompt"])}</td><td class="num">{fmt(c.get("kid"), 2)}</td>'
                       f'<td class="thumbs">{_imgs(c["images"], cache)}</td><td class="thumbs">{_imgs(c["baseline_images"], cache)}</td></tr>')
        out.append("</tbody></table>")
    out.append("</section>")
    return "".join(out)


def render_html(run: dict) -> str:
    cache: dict[str, str] = {}
    s = run["settings"]
    settings = ", ".join(f"{k} {v}" for k, v in s.items() if v is not None)
    names = ", ".join(r["name"] for r in run["entries"])
    parts = [
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>cdiff eval: {esc(names)}</title><style>{CSS}</style></head><body>",
        f"<h1>cdiff eval: {esc(names)}</h1>",
        f'<div class="meta">{esc(run["date"])} · cdiff {esc(run["cdiff_version"])} · CLIP {esc(run["models"]["clip"])}'
        f'{" · DINO " + esc(run["models"]["dino"]) if run["models"].get("dino") else ""} · device {esc(run.get("device", ""))}</div>',
        f'<div class="meta">{esc(settings)}</div>',
        '<h2>Scores</h2><div class="flex"><div>', scores_table(run),
        '<p class="small">Text alignment: CLIPScore 2.5·max(cos(image, prompt), 0), prompt without the modifier tokens. '
        "Image alignment: mean cosine similarity of generated and training images. Δ: concept minus base model. "
        "KID ×1000: base-model vs concept-model images of \"photo of a {class}\", same seeds (forgetting).</p>",
        f'<p class="small">{esc(run["kid_features"])}</p>',
        f'<p class="small">{esc(PAPER_NOTE)}</p></div>',
        f'<figure>{tradeoff_svg(plot_points(run))}<figcaption class="small">Text alignment against image alignment: '
        "up and right is better (the paper's trade-off figure). Squares: the base model, averaged over the entries; dashed lines lead from each entry's own prompts on the base model (hollow circles) to the entry.</figcaption></figure></div>",
    ]
    parts += [entry_section(r, cache) for r in run["entries"]]
    parts.append("</body></html>\n")
    return "".join(parts)


def write_report(run: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """Write OUT/report.json and OUT/report.html; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out / "report.json", out / "report.html"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(run, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(json_path)
    tmp = html_path.with_suffix(".html.tmp")
    tmp.write_text(render_html(run), encoding="utf-8")
    tmp.replace(html_path)
    return html_path, json_path
