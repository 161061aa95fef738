"""`cdiff demo` end to end at a few steps: two entries and their merge in the demo's own registry, the eval
report with the oracle's sentences, and the overview picture (its sections in order)."""

import json

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from cdiff_cli.registry import Registry
from cdiff_cli.world.demo import DEMO_CONCEPTS, THUMB, DemoSettings, run_demo


def test_demo_trains_merges_evaluates_and_draws_the_overview(tmp_path):
    res = run_demo(tmp_path / "demo", DemoSettings(steps=6, num_reg=2, images=4, n=1, sample_steps=4))
    names = [c.entry for c in DEMO_CONCEPTS]
    # each concept as trained, the same constrained (what the demo shows), and the merge of the trained two
    assert res.trained == names and res.entries == [f"{n}-constrained" for n in names] + ["+".join(names)]
    assert sorted(p.name for p in (res.registry / "concepts").iterdir()) == sorted(res.entries + names)
    reg = Registry(res.registry)
    for n in names:
        assert reg.get(f"{n}-constrained").parents == [n]
        trained = reg.get(n).manifest  # the world's masks beside the photos, which training weighed by
        assert len(trained["concepts"][0]["images"]) == 4
        assert all(len(p["mask_sha256"]) == 64 for p in trained["concepts"][0]["images"])
        assert trained["train"]["background_weight"] == DemoSettings().background_weight
    report = json.loads(res.report_json.read_text())
    for r in report["entries"]:
        assert r["prompt_set"] == "built-in: nano world"
        assert r["world"]["sentences"] == res.sentences[r["name"]]
    single = res.sentences[res.entries[0]][0]
    assert single.startswith("<pinksquare> (a pink striped square) appears in ") and " of 10 images" in single
    assert any(s.startswith("Both concepts appear together in ") for s in res.sentences[res.entries[-1]])
    assert "What the pictures show" in res.report_html.read_text()
    # Per concept: photos, samples, base; then compositions and base: 8 rows of thumbnails.
    overview = np.asarray(Image.open(res.overview).convert("RGB"))
    filled = (overview[:, 8 + THUMB // 2] != 255).any(-1)  # down the middle of the first column
    runs, length = [], 0
    for f in filled:
        length = length + 1 if f else 0
        if length == THUMB - 8:  # a thumbnail, not a line of text
            runs.append(1)
    assert len(runs) == 8 and overview.shape[1] >= 6 * THUMB


def test_demo_cli_prints_the_overview_and_the_report(tmp_path, monkeypatch):
    from cdiff_cli.cli import app
    from cdiff_cli.world import demo

    def small(steps):
        return DemoSettings(steps=steps, num_reg=2, images=4, n=1, sample_steps=4)

    monkeypatch.setattr(demo, "DemoSettings", small)
    out = CliRunner().invoke(app, ["demo", "-o", str(tmp_path / "d"), "--steps", "2", "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert data["overview"].endswith("overview.png") and data["report_html"].endswith("report.html")
    assert set(data["sentences"]) == set(data["entries"])
    # The demo's hint: the concepts as trained, in the demo's own registry, for `cdiff eval`.
    assert data["trained"] == [c.entry for c in DEMO_CONCEPTS]
    listed = CliRunner().invoke(app, ["list", "--json"], env={"CDIFF_HOME": data["registry"]})
    assert listed.exit_code == 0 and set(data["trained"]) <= {e["name"] for e in json.loads(listed.stdout)}
