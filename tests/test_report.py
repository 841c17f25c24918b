"""The HTML report: renders offline, shows every cohort, and shows the histogram table's numbers."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from colortrend.color.names import NAMED_COLORS
from colortrend.aggregate.histograms import HistogramSettings, build_histograms
from colortrend.aggregate.partials import SampleCounts
from colortrend.aggregate.report import ReportSettings, write_report

RGB = {c.en: c.rgb for c in NAMED_COLORS}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    rng = np.random.default_rng(5)
    n = 420
    ages = rng.uniform(6, 48, n)
    colours = rng.choice(["black", "white", "navy", "red", "camel", "pink"], n, p=[0.4, 0.2, 0.15, 0.1, 0.1, 0.05])
    rgb = np.array([RGB[c] for c in colours], dtype=np.uint8)
    garments = pd.DataFrame({
        "photo_id": [f"p{i:04d}" for i in range(n)], "face_idx": 0, "content_hash": [f"h{i}" for i in range(n)],
        "age": ages, "age_sd": 3.0, "taken_year": 2016, "quality_ok": True,
        "dominant_r": rgb[:, 0], "dominant_g": rgb[:, 1], "dominant_b": rgb[:, 2],
    })
    photos = pd.DataFrame({"photo_id": [*garments["photo_id"], "bad.jpg", "empty.jpg"], "taken_year": 2016,
                           "status": ["ok"] * n + ["error", "no_face"]})
    faces = garments[["photo_id", "face_idx", "quality_ok"]]
    settings = HistogramSettings(cohorts=(*HistogramSettings().cohorts, ("10后", 2010, 2019)))
    histograms = build_histograms(garments, settings).to_pandas()
    run_info = {
        "name": "<script>alert('x')</script> demo",
        "version": "0.1.0",
        "models": {"age": "0123456789abcdef", "parser": "fedcba9876543210"},
        "config": {"name": "demo", "histograms": {"cohorts": [list(c) for c in settings.cohorts], "min_persons": 10}},
    }
    out = tmp_path_factory.mktemp("out")
    index = write_report(out, histograms, SampleCounts.of_tables(photos, garments, faces), run_info,
                         ReportSettings(top_colours=20))
    return {"index": index, "html": index.read_text(encoding="utf-8"), "histograms": histograms, "out": out,
            "garments": garments, "samples": SampleCounts.of_tables(photos, garments, None), "run_info": run_info}


def cohort_section(page: str, label: str) -> str:
    match = re.search(rf'<section class="cohort"><div class="cohort-head"><h3>{re.escape(label)}</h3>.*?</section>',
                      page, re.DOTALL)
    assert match, f"no section for {label}"
    return match.group(0)


def test_report_is_written_beside_its_charts(run):
    index = run["index"]
    assert index == run["out"] / "report" / "index.html"
    pngs = sorted(p.name for p in index.parent.glob("*.png"))
    assert "cohort_shares.png" in pngs and "age_shares.png" in pngs
    for png in pngs:
        assert (index.parent / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(index.parent.glob("*.tmp")) and not list(index.parent.glob(".index.html.*"))


def test_a_rewrite_keeps_what_it_did_not_draw_and_honours_the_umask(run, tmp_path):
    """Charts a report no longer draws are removed, a file a user put beside the page is not; files get the
    umask's permissions (analysts sharing a group can read them), as open() would create them."""
    import os

    report = tmp_path / "report"
    report.mkdir()
    (report / "ranking_99.png").write_bytes(b"an old chart")
    (report / "team-logo.png").write_bytes(b"not ours")
    old = os.umask(0o002)
    try:
        index = write_report(tmp_path, run["histograms"], run["samples"], run["run_info"])
    finally:
        os.umask(old)
    assert not (report / "ranking_99.png").exists()
    assert (report / "team-logo.png").read_bytes() == b"not ours"
    for path in [index, *report.glob("*_shares.png")]:
        assert path.stat().st_mode & 0o777 == 0o664, path


def test_page_is_self_contained(run):
    embedded = re.findall(r"url\(data:([a-z/]+);base64,[A-Za-z0-9+/=]+\)", run["html"])
    assert embedded == ["font/otf"]  # the CJK subset font, inside the page
    page = re.sub(r"url\(data:[^)]*\)", "", run["html"])
    assert not re.search(r"(?i)(https?:)?//[a-z0-9]", page.replace("<!DOCTYPE html>", ""))
    assert "@import" not in page and "url(" not in page and "<script" not in page
    for ref in re.findall(r'(?:src|href)="([^"]+)"', page):
        assert (run["index"].parent / ref).is_file(), ref


def test_embedded_font_draws_every_cjk_character_of_the_page(run):
    """On a machine without a CJK font, every cohort label and colour name must still draw (no boxes)."""
    import base64
    import io

    from fontTools.ttLib import TTFont

    data, = re.findall(r"url\(data:font/otf;base64,([A-Za-z0-9+/=]+)\)", run["html"])
    cmap = TTFont(io.BytesIO(base64.b64decode(data))).getBestCmap()
    ranges = [tuple(int(x, 16) for x in r.split("-"))
              for r in re.findall(r"U\+([0-9A-F]+-[0-9A-F]+)", re.search(r"unicode-range:([^;]+);", run["html"])[1])]
    body = run["html"][run["html"].index("<body"):]
    cjk = {c for c in body if ord(c) >= 0x2E80}
    assert cjk, "the page shows cohort labels such as 95后"
    assert not [c for c in cjk if ord(c) not in cmap]
    assert all(any(lo <= ord(c) <= hi for lo, hi in ranges) for c in cjk)
    # First in the page's font list (listed last, Chromium drew the first CJK strings as boxes).
    assert re.search(r'font: [^;]*?"colortrend CJK", system-ui', run["html"])


def test_data_is_escaped(run):
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; demo" in run["html"]


def test_every_cohort_appears_with_the_tables_numbers(run):
    page, table = run["html"], run["histograms"]
    cohorts = table[table["group_type"] == "cohort"]
    for label, rows in cohorts.groupby("group", sort=False):
        section = cohort_section(page, label)
        assert f"{int(rows['group_persons'].iloc[0]):,} persons" in section
        shown = rows[~rows["suppressed"]].sort_values("rank")
        found = re.findall(r'data-bin="([^"]+)">.*?<td class="share"><b>([\d.]+)%</b> <span class="ci-text">'
                           r'([\d.]+)%–([\d.]+)%</span>.*?<td class="num">([\d,]+)</td>', section, re.DOTALL)
        assert [f[0] for f in found] == list(shown["bin_id"])  # ranked in the table's order
        for (bin_id, share, low, high, persons), (_, row) in zip(found, shown.iterrows()):
            assert share == f"{100 * row['share']:.1f}" and persons == f"{int(row['persons']):,}"
            assert (low, high) == (f"{100 * row['ci_low']:.1f}", f"{100 * row['ci_high']:.1f}")
        for _, row in rows[rows["suppressed"]].iterrows():  # greyed out, named, with the reason
            assert f'title="{row["suppressed_reason"]}"' in section and row["color_name"] in section


def test_each_cohort_winner_is_named_with_its_measured_colour(run):
    page, table = run["html"], run["histograms"]
    winners = table[(table["group_type"] == "cohort") & (table["rank"] == 1)]
    assert len(winners) == 6  # 10后 (ages 0-6) has too few persons to publish any colour
    for _, row in winners.iterrows():
        hex_code = f"#{row['rep_r']:02x}{row['rep_g']:02x}{row['rep_b']:02x}"
        assert (f'{row["group"]} · {row["color_name_zh"]} {row["color_name"]}</div>'
                f'<div class="meta code">RGB {row["rep_r"]}/{row["rep_g"]}/{row["rep_b"]}</div>') in page
        assert f'<span class="hex">{hex_code}</span>' in page
    assert "10后" in page and "not published" in page


def test_sample_counts_and_run_record_are_shown(run):
    page = run["html"]
    assert re.search(r"<td>error</td><td class=\"num\">1</td>", page)
    assert re.search(r"persons counted</td><td class=\"num\">420</td>", page)
    assert "0123456789abcdef" in page and "Resolved configuration" in page


def test_rewriting_drops_charts_of_cohorts_that_are_gone(run, tmp_path):
    table = run["histograms"]
    first = write_report(tmp_path, table, run["samples"], run["run_info"])
    before = {p.name for p in first.parent.glob("ranking_*.png")}
    fewer = table[~table["group"].isin(["00后", "95后"])]
    write_report(tmp_path, fewer, run["samples"], run["run_info"])
    after = {p.name for p in first.parent.glob("ranking_*.png")}
    assert len(after) == len(before) - 2


def test_with_a_measured_calibration_the_page_ranks_by_the_corrected_share(run, tmp_path):
    rng = np.random.default_rng(8)
    labelled = rng.integers(3, 70, 400)
    calibration = tmp_path / "calibration.csv"
    pd.DataFrame({"path": [f"f{i}.jpg" for i in range(400)], "age": labelled,
                  "predicted_age": labelled + rng.normal(0, 3, 400)}).to_csv(calibration, index=False)
    settings = HistogramSettings(age_calibration_path=str(calibration))
    table = build_histograms(run["garments"], settings).to_pandas()
    run_info = {**run["run_info"], "config": {"histograms": {"age_calibration_path": str(calibration)}}}
    page = write_report(tmp_path, table, run["samples"], run_info).read_text(encoding="utf-8")
    assert "corrected for age error" in page and "calibration.csv" in page
    cohorts = table[table["group_type"] == "cohort"]
    for label, rows in cohorts.groupby("group", sort=False):
        shown = rows[~rows["suppressed"] & rows["share_soft"].notna()].sort_values("rank_soft")
        if shown.empty:
            continue
        found = re.findall(r'data-bin="([^"]+)">.*?<td class="share"><b>([\d.]+)%</b> <span class="ci-text">'
                           r'([\d.]+)%–([\d.]+)%</span>', cohort_section(page, label), re.DOTALL)
        assert [f[0] for f in found] == list(shown["bin_id"])
        top = shown.iloc[0]
        assert found[0][1:] == (f"{100 * top['share_soft']:.1f}", f"{100 * top['share_soft_low']:.1f}",
                                f"{100 * top['share_soft_high']:.1f}")


def test_without_a_calibration_each_cohort_says_how_pure_it_is(run):
    table = run["histograms"]
    for label, rows in table[table["group_type"] == "cohort"].groupby("group", sort=False):
        if rows["purity"].notna().any():
            assert f"purity {100 * rows['purity'].iloc[0]:.0f}%" in cohort_section(run["html"], label)
    assert "raw share" in run["html"]


def test_a_tie_or_an_unclear_lead_is_said_not_crowned(tmp_path):
    rgb = np.array([RGB["black"]] * 15 + [RGB["charcoal"]] * 15 + [RGB["white"]] * 14, dtype=np.uint8)
    n = len(rgb)
    garments = pd.DataFrame({"photo_id": [f"t{i}" for i in range(n)], "face_idx": 0, "age": 19.0, "taken_year": 2016,
                             "quality_ok": True, "dominant_r": rgb[:, 0], "dominant_g": rgb[:, 1],
                             "dominant_b": rgb[:, 2]})
    photos = pd.DataFrame({"photo_id": garments["photo_id"], "taken_year": 2016, "status": "ok"})
    table = build_histograms(garments, HistogramSettings(bootstrap=200)).to_pandas()
    samples = SampleCounts.of_tables(photos, garments, None)
    page = write_report(tmp_path, table, samples, {"name": "ties"}).read_text(encoding="utf-8")
    assert "95后 · 黑色 black = 炭灰 charcoal</div>" in page and "a tie" in page
    lead = table[(table["group"] == "95后") & (table["group_type"] == "cohort")]
    assert lead["share"].max() < 0.35  # and white (14 of 44) sits inside the leaders' intervals
    assert page.count("a tie") == 1
