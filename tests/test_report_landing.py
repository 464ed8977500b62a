"""The Snakemake report's first page, as a browser shows it: ``snakemake --report`` on the tiny
workflow's run, rendered in headless Chromium (the report is a JavaScript app: its content exists
only once the page's scripts ran). Without clicking anything the landing page must hold the
headline table with summary.tsv's numbers and one map over the H&E per test slide, each decoded by
the browser.

Chromium is a Debian package that .ci/run installs. Without it the test skips, unless
COMTIP_REQUIRE_CHROMIUM=1 (set by .ci/run), which turns the skip into a failure.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pandas as pd
import pytest

from _helpers.chromium import Chromium, find_chromium
from _helpers.workflow import SAMPLES, snakemake

pytestmark = pytest.mark.e2e

TEST_SLIDES = [s for s, split in SAMPLES.items() if split == "test"]

# What the landing page shows, read once React has rendered it: the page's own state (no click),
# the headline table's cells and every image of the landing text with what the browser decoded.
LANDING = """
new Promise((resolve, reject) => {
  const started = Date.now();
  const poll = () => {
    const landing = document.querySelector('#comtip-landing');
    const images = landing ? [...landing.parentElement.querySelectorAll('img')] : [];
    if (landing && images.every(i => i.complete)) {
      const box = landing.parentElement.getBoundingClientRect();
      resolve({
        width: box.width,
        text: landing.parentElement.innerText,
        tables: [...landing.parentElement.querySelectorAll('table')].map(
          t => [...t.rows].map(r => [...r.cells].map(c => c.innerText.trim()))),
        images: images.map(i => ({alt: i.alt, src: i.src, complete: i.complete,
                                  width: i.naturalWidth, height: i.naturalHeight,
                                  shown: i.getBoundingClientRect().width})),
      });
    } else if (Date.now() - started > 60000) {
      resolve({missing: true, html: document.querySelector('#app').innerHTML.slice(0, 3000)});
    } else {
      setTimeout(poll, 200);
    }
  };
  poll();
})
"""


@pytest.fixture(scope="module")
def chromium() -> str:
    path = find_chromium()
    if path is None:
        message = "no Chromium on this machine (looked for chromium, chromium-headless-shell, google-chrome)"
        if os.environ.get("COMTIP_REQUIRE_CHROMIUM") == "1":
            pytest.fail(message + " (COMTIP_REQUIRE_CHROMIUM=1: .ci/run installs the Debian package chromium)")
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def landing(tiny_run, chromium) -> dict:
    snakemake(tiny_run, "--report", "landing_report.html")
    with Chromium(chromium) as browser:
        browser.open(tiny_run / "landing_report.html")
        page = browser.evaluate(LANDING)
    assert not page.get("missing"), f"the landing page has no #comtip-landing block: {page.get('html')}"
    return page


def test_landing_page_shows_the_headline_table_of_summary_tsv(tiny_run, landing):
    summary = pd.read_csv(tiny_run / "results" / "evaluation" / "summary.tsv", sep="\t")
    sets = list(dict.fromkeys(summary["gene_set"]))
    methods = list(dict.fromkeys(summary["method"]))
    assert landing["width"] > 600, "the landing text is too narrow to read the table and maps"
    assert len(landing["tables"]) == 1, landing["text"][:2000]
    header, *rows = landing["tables"][0]
    assert header == ["method", *(f"Pearson {s}" for s in sets), "MSE all"]
    assert [r[0] for r in rows] == methods
    cells = {r[0]: dict(zip(header[1:], r[1:], strict=True)) for r in rows}
    for row in summary.itertuples():
        value = row.pearson_mean
        expected = "n/a" if pd.isna(value) else f"{value:.3f}"
        assert cells[row.method][f"Pearson {row.gene_set}"] == expected, (row.method, row.gene_set)
        if row.gene_set == "all":
            assert cells[row.method]["MSE all"] == f"{row.mse_mean:.3f}"
    # the numbers are real: some method correlates on the test slide (the demo's ridge does)
    assert max(float(v) for r in rows for v in r[1:-1] if v != "n/a") > 0.1


def test_landing_page_shows_a_decoded_map_over_the_he_per_test_slide(tiny_run, landing):
    maps = tiny_run / "results" / "evaluation" / "maps"
    images = [i for i in landing["images"] if "maps/" in i["alt"]]
    assert sorted(Path(i["alt"]).stem for i in images) == sorted(TEST_SLIDES), landing["images"]
    for image in images:
        assert image["complete"] and image["width"] > 400 and image["height"] > 200, image | {"src": "..."}
        assert image["shown"] > 300, "the map is on the page but drawn too small to read"
        header, data = image["src"].split(",", 1)
        assert header == "data:image/png;base64"
        # the figure the browser decoded is the rule's file, byte for byte
        assert base64.b64decode(data) == (maps / Path(image["alt"]).name).read_bytes()
    assert "over the H&E" in landing["text"]
