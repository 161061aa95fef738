"""The eval report is one self-contained HTML file: checked as text, then rendered by a real browser
(Debian's chromium, headless; skipped only where /usr/bin/chromium is absent — CI installs it)."""

import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from cdiff_cli.evaluation.report import nice_ticks, plot_points, render_html, tradeoff_svg, write_report

CHROMIUM = Path("/usr/bin/chromium")


def _png(path: Path, colour, size=256) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", (size, size), (240, 240, 240))
    ImageDraw.Draw(im).ellipse((size // 5, size // 5, 4 * size // 5, 4 * size // 5), fill=colour)
    im.save(path)
    return str(path)


def fake_run(root: Path) -> dict:
    """A run shaped like `evaluate_entries`' result: a single-concept entry with DINO scores and a
    two-concept entry, with real PNG files."""
    def entry(name, tokens, classes, colour, text, image, dino=None):
        train = [_png(root / "train" / name / f"t{i}.png", colour, 96) for i in range(3)]
        prompts = []
        for j, tmpl in enumerate(["photo of a {} on a beach", "a watercolor painting of a {}"]):
            phrase = " and a ".join(f"{t} {c}" for t, c in zip(tokens, classes))
            prompt = tmpl.format(phrase)
            prompts.append({
                "prompt": prompt, "text": " ".join(w for w in prompt.split() if w not in tokens), "kind": "recontextualisation",
                "text_alignment": text + 0.01 * j, "baseline_text_alignment": text - 0.02,
                "images": [_png(root / name / "concept" / f"p{j}-{k}.png", colour) for k in range(2)],
                "baseline_images": [_png(root / name / "base" / f"p{j}-{k}.png", (90, 90, 90)) for k in range(2)],
            })
        per_concept = [{"token": t, "class": c, "training_images": train, "image_alignment": image,
                        "image_alignment_dino": dino, "baseline_image_alignment": image - 0.05,
                        "baseline_image_alignment_dino": None if dino is None else dino - 0.1} for t, c in zip(tokens, classes)]
        classes_rows = [{"class": c, "prompt": f"photo of a {c}", "kid": 1.25,
                         "images": [_png(root / name / "cc" / f"{c}{k}.png", colour, 64) for k in range(2)],
                         "baseline_images": [_png(root / name / "cb" / f"{c}{k}.png", (90, 90, 90), 64) for k in range(2)]}
                        for c in classes]
        return {
            "name": name, "id": "abcd1234", "kind": "trained", "tokens": tokens, "classes": classes, "base": "/models/sd15",
            "prompt_set": "built-in: pet", "text_alignment": text, "image_alignment": image, "image_alignment_dino": dino,
            "kid": 1.25, "baseline": {"text_alignment": text - 0.02, "image_alignment": image - 0.05,
                                      "image_alignment_dino": None if dino is None else dino - 0.1},
            "delta": {"text_alignment": 0.02, "image_alignment": 0.05, "image_alignment_dino": None if dino is None else 0.1},
            "forgetting": {"kid_x1000": 1.25, "samples_per_class": 2, "classes": classes_rows},
            "per_concept": per_concept, "prompts": prompts, "images": {}, "notes": ["a note <with> markup"], "seconds": 1.5,
        }

    return {
        "cdiff_version": "0.0.test", "date": "2026-01-01T00:00:00+00:00",
        "models": {"clip": "openai/clip-vit-base-patch32", "dino": "facebook/dino-vits16"},
        "settings": {"n": 2, "steps": 25, "guidance": 6.0, "seed": 0},
        "kid_features": "KID is computed on CLIP image embeddings.", "device": "cpu", "seconds": 3.0,
        "out_dir": str(root), "entries": [
            entry("mycat", ["<mycat>"], ["cat"], (220, 40, 40), 0.76, 0.74, 0.53),
            entry("cat+chair", ["<mycat>", "V2"], ["cat", "chair"], (40, 40, 220), 0.70, 0.66),
        ],
    }


def test_report_is_self_contained(tmp_path):
    run = fake_run(tmp_path / "imgs")
    html_path, json_path = write_report(run, tmp_path / "out")
    page = html_path.read_text()
    assert json.loads(json_path.read_text())["entries"][1]["name"] == "cat+chair"
    assert "<script" not in page.lower()
    srcs = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "a note &lt;with&gt; markup" in page  # text is escaped
    # Thumbnails are scaled down: a 256 px sample becomes at most 128 px.
    import base64
    import io

    first = srcs[0].split(",", 1)[1]
    assert max(Image.open(io.BytesIO(base64.b64decode(first))).size) <= 128


def test_tradeoff_plot_points_and_ticks():
    run = {"entries": [
        {"name": "a", "base": "B", "text_alignment": 0.7, "image_alignment": 0.6,
         "baseline": {"text_alignment": 0.8, "image_alignment": 0.4}},
        {"name": "b", "base": "B", "text_alignment": 0.75, "image_alignment": None,
         "baseline": {"text_alignment": 0.7, "image_alignment": None}},
    ]}
    pts = plot_points(run)
    assert [p["label"] for p in pts] == ["a", "base"]
    assert pts[1]["x"] == pytest.approx(0.8) and pts[1]["y"] == pytest.approx(0.4)
    svg = tradeoff_svg(pts)
    assert svg.count('class="pt entry"') == 1 and svg.count('class="pt base"') == 1
    assert nice_ticks(0.61, 0.79) == [0.65, 0.7, 0.75]
    assert nice_ticks(0.0, 2.5) == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert "no image alignment" in tradeoff_svg([])
    assert "<svg" in render_html({**fake_run_minimal(), "entries": []})


def fake_run_minimal():
    return {"cdiff_version": "x", "date": "d", "models": {"clip": "c", "dino": None}, "settings": {}, "kid_features": "k",
            "entries": []}


def _chromium(*args, tmp_path: Path):
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


# In CI (CI=true) the browser is installed by .ci/run, so a missing browser fails instead of skipping.
@pytest.mark.skipif(not CHROMIUM.exists() and not os.environ.get("CI"), reason="needs Debian's chromium (apt-get install chromium)")
def test_report_renders_in_a_browser(tmp_path):
    run = fake_run(tmp_path / "imgs")
    html_path, _ = write_report(run, tmp_path / "out")
    url = html_path.resolve().as_uri()

    dom = _chromium("--dump-dom", url, tmp_path=tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert '<table class="scores">' in html and "<svg" in html
    assert html.count('class="pt entry"') == 2 and html.count('class="pt base"') == 1
    assert html.count("<section") == 2 and "photo of a chair" in html

    shot = tmp_path / "report.png"
    r = _chromium(f"--screenshot={shot}", "--window-size=1200,1600", url, tmp_path=tmp_path)
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("RGB"), dtype=float)
    assert img.shape[:2] == (1600, 1200)
    assert img.std() > 10  # not a blank page
    # The blue entry dots of the plot (#2a6fdb) are on the page.
    blue = (np.abs(img - np.array([0x2A, 0x6F, 0xDB])).sum(axis=2) < 30).sum()
    assert blue > 50
