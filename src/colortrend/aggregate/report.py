"""The HTML report: ranked, named colour swatches per cohort with intervals, a cohort comparison, sample counts, the
run's configuration and model versions, and PNG charts beside it.

``write_report`` writes ``<out>/report/index.html`` and its charts (``report/*.png``, referenced relatively). The
page is self-contained: CSS is inlined, no font, script or image is fetched from anywhere, so it opens offline and
from a copied folder. Everything that comes from data (names, paths, config values) is HTML-escaped.

The numbers on the page are the ``histograms/`` table's, formatted, never recomputed: suppressed cells stay hidden
(shown greyed with their reason), and what the page says about a cohort can be checked against that table.
"""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import html
import io
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from colortrend.aggregate.histograms import HistogramSettings
from colortrend.io.store import Store, atomic_write

if TYPE_CHECKING:
    from colortrend.aggregate.partials import SampleCounts

#: Fonts tried for Chinese labels in the PNG charts before the shipped subset.
CJK_FONTS = ("Noto Sans CJK SC", "Source Han Sans SC", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei", "PingFang SC",
             "Microsoft YaHei", "SimHei", "Droid Sans Fallback")
#: Noto Sans CJK SC (OFL-1.1) cut to the glyphs of the colour names and default cohort labels
#: (``scripts/make_cjk_subset.py``): Chinese renders on a machine with no Chinese font, in the page and the charts.
CJK_SUBSET = Path(__file__).resolve().parent.parent / "report_assets" / "cjk-subset.otf"
SUPPRESSED_GREY = "#d4d4d8"
#: The charts this module draws beside the page (and so may delete when a report no longer draws one).
CHART_NAME = re.compile(r"(cohort_shares|age_shares|ranking_\d+)\.png")


@dataclass(frozen=True)
class ReportSettings:
    # Page heading; empty uses the run's name.
    title: str = ""
    # Ranked colours listed per cohort (all published cells stay in the histograms table).
    top_colours: int = 12
    # Colours of each cohort's top ranks that enter the cohort comparison grid.
    compare_top: int = 5

    def __post_init__(self) -> None:
        if self.top_colours < 1 or self.compare_top < 1:
            raise ValueError("top_colours and compare_top: must be at least 1")


def write_report(
    out_dir: Path,
    histograms: pd.DataFrame,
    samples: SampleCounts,
    run_info: dict[str, Any],
    settings: ReportSettings | None = None,
) -> Path:
    """Write ``out_dir/report/index.html`` and its PNG charts; return the path of ``index.html``.

    ``histograms``: the ``histograms/`` table; ``samples``: the sample counts of the committed shards (merged from
    their partials, or ``SampleCounts.of_tables`` of a run's tables); ``run_info``: the run's record, all of it
    shown (``name``, ``version``, ``models``, and
    ``config``, whose ``histograms`` section also feeds the method notes). Each file is written under a temporary
    name and renamed, the page last, so a reader never sees a half-written file.
    """
    settings = settings or ReportSettings()
    report_dir = Path(out_dir) / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    stats = _histogram_settings(run_info)
    corrected = stats.age_calibration_path is not None
    cohorts = _groups(histograms, "cohort", corrected)
    buckets = _groups(histograms, "age_bucket", corrected)

    charts = _Charts(report_dir)
    stacked_cohorts = charts.stacked(cohorts, "cohort_shares.png", "Share of persons by colour, per birth cohort")
    stacked_ages = charts.stacked(buckets, "age_shares.png", "Share of persons by colour, per age bucket")
    rankings = {label: charts.ranking(rows, f"ranking_{i}.png") for i, (label, rows) in enumerate(cohorts.items())}
    charts.remove_stale()

    page = _page(
        cohorts=cohorts,
        buckets=buckets,
        counts=_sample_counts(samples, histograms),
        run_info=run_info,
        settings=settings,
        stats=stats,
        charts={"cohorts": stacked_cohorts, "ages": stacked_ages, "rankings": rankings},
    )
    index = report_dir / "index.html"
    atomic_write(index, page.encode("utf-8"))
    return index


def publish_report(store: Store, histograms: pd.DataFrame, samples: SampleCounts, run_info: dict[str, Any],
                   settings: ReportSettings | None = None) -> str:
    """``write_report`` into ``store``'s ``report/``: in place on a local disk; elsewhere drawn in a temporary folder
    and uploaded with ``index.html`` last (a reader never sees a page whose charts are missing).
    Returns its location."""
    if store.local:
        return str(write_report(store.root, histograms, samples, run_info, settings))
    with tempfile.TemporaryDirectory() as tmp:
        write_report(tmp, histograms, samples, run_info, settings)
        store.upload_folder("report", os.path.join(tmp, "report"), last="index.html")
    return store.uri("report", "index.html")


def _histogram_settings(run_info: dict[str, Any]) -> HistogramSettings:
    """The histogram settings recorded in the run's config (the defaults when the record has none)."""
    raw = (run_info.get("config") or {}).get("histograms") or {}
    known = {f.name for f in dataclasses.fields(HistogramSettings)}
    values = {k: v for k, v in raw.items() if k in known}
    if "cohorts" in values:
        values["cohorts"] = tuple(tuple(c) for c in values["cohorts"])
    return HistogramSettings(**values)


# -------------------------------------------------------------------------------------------------------------- data
#: The columns the page shows and ranks by: the raw share, or (with a measured age calibration) the corrected one;
#: ``other_share`` is the column shown beside it.
SHOWN = {False: {"shown_share": "share", "shown_low": "ci_low", "shown_high": "ci_high", "shown_rank": "rank",
                 "other_share": "share_soft"},
         True: {"shown_share": "share_soft", "shown_low": "share_soft_low", "shown_high": "share_soft_high",
                "shown_rank": "rank_soft", "other_share": "share"}}


def _groups(histograms: pd.DataFrame, group_type: str, corrected: bool = False) -> dict[str, pd.DataFrame]:
    """The rows of each group of one type, groups ordered by their first year, rows by the rank shown (suppressed
    last), with the ``SHOWN`` columns of ``corrected``."""
    rows = histograms[histograms["group_type"] == group_type]
    rows = rows.assign(**{shown: rows[column] for shown, column in SHOWN[corrected].items()})
    order = rows.groupby("group", sort=False)["group_first"].first().sort_values(kind="stable")
    out = {}
    for label in order.index:
        part = rows[rows["group"] == label]
        rank = np.nan_to_num(_num(part["shown_rank"]), nan=math.inf)
        out[str(label)] = part.assign(_rank=rank).sort_values("_rank", kind="stable").drop(columns="_rank")
    return out


def _sample_counts(samples: SampleCounts, histograms: pd.DataFrame) -> dict[str, Any]:
    buckets = histograms[histograms["group_type"] == "age_bucket"].drop_duplicates("group")
    cohorts = histograms[histograms["group_type"] == "cohort"].drop_duplicates("group")
    return {
        "photos": samples.photos,
        "years": [str(y) for y in sorted(samples.years)],
        "by_status": sorted(samples.by_status.items(), key=lambda kv: (-kv[1], kv[0])),
        "faces": samples.faces,
        "faces_ok": samples.faces_ok,
        "measured": samples.measured,
        # Age buckets hold every counted person (they span the youngest to the oldest estimate).
        "counted": int(buckets["group_persons"].sum()),
        "in_cohorts": int(cohorts["group_persons"].sum()),
    }


# ------------------------------------------------------------------------------------------------------------ charts
class _Charts:
    """PNG charts drawn with matplotlib's object API on the Agg canvas (no pyplot state, no display needed)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.written: set[str] = set()

    def _label(self, rows: pd.DataFrame) -> str:
        """A group's chart label: its own name when the glyphs can be drawn, else its span of years."""
        first, last = int(rows["group_first"].iloc[0]), int(rows["group_last"].iloc[0])
        label = str(rows["group"].iloc[0])
        if rows["group_type"].iloc[0] == "age_bucket":
            return label
        return f"{label}  {first}–{last}" if _cjk_font() or label.isascii() else f"born {first}–{last}"

    @contextlib.contextmanager
    def _style(self) -> Iterator[None]:
        """matplotlib settings for drawing *and* saving (tick labels take their font when drawn)."""
        import matplotlib

        family = [_cjk_font(), "DejaVu Sans"] if _cjk_font() else ["DejaVu Sans"]
        # A CJK font lacking a "normal" weight makes every lookup log a warning; the fallback is the right font.
        font_log = logging.getLogger("matplotlib.font_manager")
        level = font_log.level
        font_log.setLevel(logging.ERROR)
        try:
            with matplotlib.rc_context({"font.family": family, "axes.edgecolor": "#a1a1a6", "xtick.color": "#3f3f46",
                                        "ytick.color": "#1d1d1f", "hatch.color": "white"}):
                yield
        finally:
            font_log.setLevel(level)

    def _save(self, fig, name: str) -> str:
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        FigureCanvasAgg(fig)
        buffer = io.BytesIO()
        # No "Software" stamp: the same run draws byte-identical charts.
        fig.savefig(buffer, format="png", metadata={"Software": None}, facecolor="white")
        atomic_write(self.folder / name, buffer.getvalue())
        self.written.add(name)
        return name

    def stacked(self, groups: dict[str, pd.DataFrame], name: str, title: str) -> str | None:
        """One 100 % bar per group, segments in rank order in each cell's colour, suppressed cells as one grey end."""
        if not groups:
            return None
        from matplotlib.figure import Figure

        with self._style():
            fig = Figure(figsize=(10, 0.55 * len(groups) + 1.4), dpi=144)
            ax = fig.add_axes((0.17, 0.12, 0.8, 0.74))
            labels = []
            for y, rows in enumerate(groups.values()):
                labels.append(self._label(rows))
                left = 0.0
                for _, row in _published(rows).iterrows():
                    colour = _rgb01(row)
                    share = row["shown_share"]
                    ax.barh(y, share, left=left, color=colour, edgecolor="white", linewidth=0.8, height=0.72)
                    if share >= 0.06:
                        ax.text(left + share / 2, y, f"{100 * share:.0f}%", ha="center", va="center",
                                fontsize=8, color=_ink_on(colour))
                    left += row["shown_share"]
                if int(rows["group_persons"].iloc[0]) > 0 and left < 1 - 1e-9:
                    ax.barh(y, 1 - left, left=left, color=SUPPRESSED_GREY, hatch="///", edgecolor="white",
                            linewidth=0.8, height=0.72)
            ax.set_yticks(range(len(labels)), labels)
            ax.invert_yaxis()
            ax.set_xlim(0, 1)
            ax.xaxis.set_major_formatter(lambda v, _: f"{100 * v:.0f}%")
            ax.tick_params(length=0, labelsize=9)
            for side in ("top", "right", "left"):
                ax.spines[side].set_visible(False)
            ax.set_title(title, loc="left", fontsize=11, fontweight="bold", pad=10)
            fig.text(0.17, 0.02, "Hatched grey: colours with too few persons to publish.", fontsize=8, color="#6e6e73")
            return self._save(fig, name)

    def ranking(self, rows: pd.DataFrame, name: str) -> str | None:
        """The ranked swatch bar of one cohort: bar length = share, whisker = confidence interval."""
        shown = _published(rows).head(10)
        if shown.empty:
            return None
        from matplotlib.figure import Figure

        with self._style():
            fig = Figure(figsize=(3.8, 0.32 * len(shown) + 1.0), dpi=144)
            ax = fig.add_axes((0.34, 0.1, 0.6, 0.76))
            y = np.arange(len(shown))
            colours = [_rgb01(r) for _, r in shown.iterrows()]
            share, low, high = _num(shown["shown_share"]), _num(shown["shown_low"]), _num(shown["shown_high"])
            err = np.clip(np.vstack([share - low, high - share]), 0, None)
            ax.barh(y, share, color=colours, edgecolor="#3f3f46", linewidth=0.4, height=0.7)
            ax.errorbar(share, y, xerr=err, fmt="none", ecolor="#9b2c2c", elinewidth=1, capsize=2)
            names = [str(r["color_name"]) if not _cjk_font() else f"{r['color_name_zh']} {r['color_name']}"
                     for _, r in shown.iterrows()]
            ax.set_yticks(y, names)
            ax.invert_yaxis()
            ax.set_xlim(0, min(1.0, float(np.nanmax(high)) * 1.12 + 0.02))
            ax.xaxis.set_major_formatter(lambda v, _: f"{100 * v:.0f}%")
            ax.tick_params(length=0, labelsize=9)
            for side in ("top", "right"):
                ax.spines[side].set_visible(False)
            n = int(rows["group_persons"].iloc[0])
            ax.set_title(f"{self._label(rows)} · n = {n:,}", loc="left", fontsize=9.5, fontweight="bold")
            return self._save(fig, name)

    def remove_stale(self) -> None:
        """Delete charts of an earlier report that this one no longer draws (e.g. a cohort was removed): files named
        as this module names its charts, nothing else a user may have put beside the page."""
        for path in self.folder.glob("*.png"):
            if CHART_NAME.fullmatch(path.name) and path.name not in self.written:
                path.unlink()


@functools.cache
def _cjk_font() -> str | None:
    """The first installed font of ``CJK_FONTS``, else the shipped subset (registered with matplotlib)."""
    from matplotlib import font_manager

    installed = {f.name for f in font_manager.fontManager.ttflist}
    found = next((name for name in CJK_FONTS if name in installed), None)
    if found or not CJK_SUBSET.is_file():
        return found
    font_manager.fontManager.addfont(str(CJK_SUBSET))
    return font_manager.FontProperties(fname=str(CJK_SUBSET)).get_name()


@functools.cache
def _font_face_css() -> str:
    """An @font-face rule embedding the shipped CJK subset (a data: URL, so the page still fetches nothing)."""
    if not CJK_SUBSET.is_file():
        return ""
    data = base64.b64encode(CJK_SUBSET.read_bytes()).decode("ascii")
    return ('@font-face { font-family: "colortrend CJK"; font-display: block; '
            "unicode-range: U+2E80-9FFF, U+F900-FAFF, U+FF00-FFEF; "
            f'src: url(data:font/otf;base64,{data}) format("opentype"); }}\n')


def _num(values: pd.Series) -> np.ndarray:
    """Any numeric column (numpy, nullable or Arrow-backed dtype) as float64 with NaN for missing values."""
    return pd.to_numeric(values, errors="coerce").astype("Float64").to_numpy(dtype=np.float64, na_value=np.nan)


def _published(rows: pd.DataFrame) -> pd.DataFrame:
    """The cells the page shows: published, and with a value in the column it ranks by."""
    return rows[~rows["suppressed"].astype(bool) & rows["shown_share"].notna()]


def _rgb01(row: pd.Series) -> tuple[float, float, float]:
    return (int(row["rep_r"]) / 255, int(row["rep_g"]) / 255, int(row["rep_b"]) / 255)


def _ink_on(rgb01: Iterable[float]) -> str:
    """Black or white text, whichever reads better on this background (WCAG relative luminance)."""
    lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb01]
    luminance = 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]
    return "#1d1d1f" if luminance > 0.23 else "#ffffff"


# -------------------------------------------------------------------------------------------------------------- html
def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _pct(value: Any) -> str:
    return "–" if value is None or pd.isna(value) else f"{100 * float(value):.1f}%"


def _hex(row: pd.Series) -> str:
    return f"#{int(row['rep_r']):02x}{int(row['rep_g']):02x}{int(row['rep_b']):02x}"


def _rgb_text(row: pd.Series) -> str:
    return f"RGB {int(row['rep_r'])}/{int(row['rep_g'])}/{int(row['rep_b'])}"


def _int(value: Any) -> str:
    return "–" if value is None or pd.isna(value) else f"{int(value):,}"


def _page(*, cohorts: dict[str, pd.DataFrame], buckets: dict[str, pd.DataFrame], counts: dict[str, Any],
          run_info: dict[str, Any], settings: ReportSettings, stats: HistogramSettings, charts: dict[str, Any]) -> str:
    name = settings.title or run_info.get("name") or "colortrend run"
    years = counts["years"]
    css = _font_face_css() + resources.files("colortrend").joinpath("report_assets/report.css").read_text(
        encoding="utf-8")
    subtitle = (f"What each birth cohort wears, measured on {counts['counted']:,} persons in "
                f"{counts['photos']:,} photos" + (f" taken in {', '.join(years)}" if years else "") + ".")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(name)} · colour report</title>",
        f"<style>{css}</style></head><body>",
        (f'<header><div class="kicker">colortrend colour report</div><h1>{_e(name)}</h1>'
         f'<p class="lead">{_e(subtitle)}</p></header>'),
        _stats(counts),
        _notice(cohorts, stats, counts),
        _winners(cohorts, stats),
        _cohort_sections(cohorts, settings, stats),
        _comparison(cohorts, charts["cohorts"], settings.compare_top),
        _ages(buckets, charts["ages"]),
        _gallery(charts["rankings"]),
        _method(stats, has_sales=any(rows["sales_share"].notna().any() for rows in cohorts.values())),
        _samples(counts),
        _run(run_info),
        (f"<footer>Generated by colortrend {_e(run_info.get('version', ''))}"
         f"{' · ' + _e(run_info['finished']) if run_info.get('finished') else ''}. "
         "Nothing is loaded from the network: the page and the PNG charts beside it are all there is.</footer>"),
        "</body></html>",
    ]
    return "\n".join(parts)


def _stats(counts: dict[str, Any]) -> str:
    items = [("photos", counts["photos"]), ("faces detected", counts["faces"]),
             ("persons measured", counts["measured"]), ("persons counted", counts["counted"]),
             ("in a cohort", counts["in_cohorts"])]
    cards = "".join(f'<div class="stat"><b>{_int(v)}</b><span>{_e(k)}</span></div>' for k, v in items if v is not None)
    return f'<div class="stats">{cards}</div>'


def _notice(cohorts: dict[str, pd.DataFrame], stats: HistogramSettings, counts: dict[str, Any]) -> str:
    """A warning at the top when no cohort has a single publishable colour (typically a small demo collection)."""
    if any(len(_published(rows)) for rows in cohorts.values()):
        return ""
    if not counts["counted"]:
        return ('<div class="notice">No person was counted: no face passed the quality filters in these photos '
                "(see the photo statuses and the faces' filter reasons under Sample).</div>")
    return (f'<div class="notice">No colour of any cohort reaches {stats.min_persons} persons, so nothing is '
            'published. Run on more photos, or lower <span class="code">histograms.min_persons</span> for a '
            "collection whose people need no protection (a demo).</div>")


def _winners(cohorts: dict[str, pd.DataFrame], settings: HistogramSettings) -> str:
    cards = []
    for label, rows in cohorts.items():
        top = _published(rows)
        span = f"{int(rows['group_first'].iloc[0])}–{int(rows['group_last'].iloc[0])}"
        if top.empty:
            cards.append(f'<div class="winner empty"><div class="chip">{_e(label)}</div><div class="body">'
                         f'<div class="name">not published</div><div class="meta">born {span} · '
                         f'{_int(rows["group_persons"].iloc[0])} persons; each colour needs '
                         f'{settings.min_persons}</div></div></div>')
            continue
        row = top.iloc[0]
        colour = _hex(row)
        tied = top[top["shown_share"] == row["shown_share"]]
        names = " = ".join(f'{_e(r["color_name_zh"])} {_e(r["color_name"])}' for _, r in tied.iterrows())
        runner_up = top.iloc[len(tied)] if len(top) > len(tied) else None
        if len(tied) > 1:
            verdict = '<div class="meta verdict">a tie</div>'
        elif runner_up is not None and float(runner_up["shown_high"]) >= float(row["shown_low"]):
            verdict = (f'<div class="meta verdict">not clearly ahead of {_e(runner_up["color_name"])} '
                       f'({_pct(runner_up["shown_share"])}): the intervals overlap</div>')
        else:
            verdict = ""
        cards.append(
            f'<div class="winner"><div class="chip" style="background:{colour};color:{_ink_on(_rgb01(row))}">'
            f'<span>{_e(label)}</span><span class="hex">{colour}</span></div><div class="body">'
            f'<div class="name">{_e(label)} · {names}</div>'
            f'<div class="meta code">{_rgb_text(row)}</div><div class="meta"><b>{_pct(row["shown_share"])}</b> '
            f'({_pct(row["shown_low"])}–{_pct(row["shown_high"])}) of {_int(row["group_persons"])} born {span}</div>'
            f'{verdict}</div></div>'
        )
    return ('<h2>The colour of each cohort</h2><p class="note">The most worn colour of each birth cohort, shown in '
            'its measured colour (the median of the persons wearing it), like the original "95后" ranking whose '
            'winner, a near-black of RGB 22/20/24, was named 95度黑.</p>'
            f'<div class="winners">{"".join(cards)}</div>')


def _basis_note(stats: HistogramSettings) -> str:
    """What the shares shown are: corrected for age error with a measured calibration, or raw counts."""
    if stats.age_calibration_path:
        return ("Ranked by the share <b>corrected for age error</b>, measured on the labelled faces of "
                f'<span class="code">{_e(Path(stats.age_calibration_path).name)}</span>: each cohort as if every '
                f"age were known exactly. Its {stats.ci:.0%} interval covers the sampling error of the persons and "
                "of the calibration. The raw share (persons counted in the cohort by their estimated age) is shown "
                "beside it.")
    return ("Ranked by the <b>raw share</b>: persons counted in the cohort of their estimated age. Age errors blur "
            "neighbouring cohorts; <i>purity</i> is the estimated share of a cohort's persons truly born in it "
            "(from the default age model's measured error). Set <span class=\"code\">histograms."
            "age_calibration_path</span> to rank by the corrected share (see the README).")


def _cohort_sections(cohorts: dict[str, pd.DataFrame], settings: ReportSettings, stats: HistogramSettings) -> str:
    corrected = stats.age_calibration_path is not None
    out = [('<h2>Ranked colours per cohort</h2><p class="note">Share of the cohort\'s persons whose dominant garment '
            f'colour falls in each colour bin, with its {stats.ci:.0%} bootstrap interval (red whisker). '
            f'{_basis_note(stats)} Lift compares the raw share with the other cohorts (×1.5 = worn 1.5 times as '
            'often).</p>')]
    for label, rows in cohorts.items():
        first, last = int(rows["group_first"].iloc[0]), int(rows["group_last"].iloc[0])
        persons = int(rows["group_persons"].iloc[0])
        published = _published(rows)
        has_sales = "sales_share" in rows and rows["sales_share"].notna().any()
        purity = _num(rows["purity"])[0] if "purity" in rows and len(rows) else np.nan
        purity_text = (f' · purity {100 * purity:.0f}%' if np.isfinite(purity) else "")
        head = (f'<div class="cohort-head"><h3>{_e(label)}</h3><div class="sub">born {first}–{last} · '
                f'{persons:,} persons{purity_text} · {len(published)} colours published</div></div>')
        table = _ranking_table(published.head(settings.top_colours), has_sales, corrected) if len(published) else (
            f'<p class="note">No colour reaches {stats.min_persons} persons in this cohort.</p>')
        more = len(published) - settings.top_colours
        if more > 0:
            table += f'<p class="note">{more} more published colour(s) in the histograms table.</p>'
        out.append(f'<section class="cohort">{head}{table}{_suppressed(rows)}</section>')
    return "".join(out)


def _gallery(rankings: dict[str, str | None]) -> str:
    """The per-cohort ranking charts (PNG files beside the page, for slides and reports)."""
    figures = "".join(f'<figure><img src="{_e(png)}" alt="{_e(label)} ranking"><figcaption>{_e(label)} · '
                      f'<a href="{_e(png)}">{_e(png)}</a></figcaption></figure>'
                      for label, png in rankings.items() if png)
    if not figures:
        return ""
    return ('<h2>Charts</h2><p class="note">The ranking of each cohort as a PNG file in this folder (bars: share; '
            f'whiskers: confidence interval).</p><div class="gallery">{figures}</div>')


def _ranking_table(rows: pd.DataFrame, has_sales: bool, corrected: bool) -> str:
    scale = max(float(rows["shown_high"].max()), 1e-9)
    head = ('<tr><th></th><th>colour</th><th></th><th>share</th><th class="num">persons</th>'
            f'<th class="num">{"raw" if corrected else "corrected"}</th><th class="num">lift</th>'
            + ('<th class="num">sales</th><th class="num">blend #</th>' if has_sales else "") + "</tr>")
    body = []
    for _, r in rows.iterrows():
        fill = 100 * float(r["shown_share"]) / scale
        lo, hi = 100 * float(r["shown_low"]) / scale, 100 * float(r["shown_high"]) / scale
        lift = "–" if pd.isna(r["lift"]) else f"×{float(r['lift']):.2f}"
        sales = (f'<td class="num">{_pct(r["sales_share"])}</td><td class="num">{_int(r["blended_rank"])}</td>'
                 if has_sales else "")
        body.append(
            f'<tr class="{"top" if int(r["shown_rank"]) == 1 else ""}" data-bin="{_e(r["bin_id"])}">'
            f'<td class="rank">{int(r["shown_rank"])}</td>'
            f'<td><span class="sw" style="background:{_hex(r)}"></span></td>'
            f'<td class="cname"><b>{_e(r["color_name_zh"])}</b> {_e(r["color_name"])}<br>'
            f'<span class="code">{_rgb_text(r)} · {_hex(r)}</span></td>'
            f'<td class="share"><b>{_pct(r["shown_share"])}</b> <span class="ci-text">{_pct(r["shown_low"])}–'
            f'{_pct(r["shown_high"])}</span><div class="bar"><div class="fill" style="width:{fill:.1f}%"></div>'
            f'<div class="ci" style="left:{lo:.1f}%;width:{max(hi - lo, 0.5):.1f}%"></div></div></td>'
            f'<td class="num">{_int(r["persons"])}</td><td class="num">{_pct(r["other_share"])}</td>'
            f'<td class="num">{lift}</td>{sales}</tr>'
        )
    return f'<div class="scroll"><table>{head}{"".join(body)}</table></div>'


def _suppressed(rows: pd.DataFrame) -> str:
    hidden = rows[rows["suppressed"].astype(bool)]
    if hidden.empty:
        return ""
    tags = "".join(
        f'<span class="tag" title="{_e(r["suppressed_reason"])}"><i style="background:{_hex(r)}"></i>'
        f'{_e(r["color_name_zh"])} {_e(r["color_name"])}</span>' for _, r in hidden.iterrows())
    reasons = " / ".join(sorted({str(r) for r in hidden["suppressed_reason"].dropna()}))
    return (f'<details class="suppressed"><summary>{len(hidden)} colour(s) not published ({_e(reasons)})</summary>'
            f'{tags}</details>')


def _comparison(cohorts: dict[str, pd.DataFrame], chart: str | None, top: int) -> str:
    """Cohorts side by side: the union of each cohort's top colours, one row per colour bin."""
    if not cohorts:
        return ""
    every = pd.concat(cohorts.values())
    if every["suppressed"].astype(bool).all():
        return ""
    top_bins = every[_num(every["shown_rank"]) <= top]
    weight = pd.Series(_num(top_bins["persons"]), index=top_bins["bin_id"].to_numpy()).groupby(level=0).sum()
    weight = weight.sort_values(ascending=False, kind="stable")
    peak = np.nanmax(_num(every["shown_share"]), initial=0.0)
    peak = float(peak) if peak > 0 else 1.0
    head = "<tr><th>colour</th>" + "".join(f"<th>{_e(c)}</th>" for c in cohorts) + "</tr>"
    body = []
    for bin_id in weight.index:
        first = every[every["bin_id"] == bin_id].iloc[0]
        cells = []
        for rows in cohorts.values():
            cell = rows[rows["bin_id"] == bin_id]
            if cell.empty or bool(cell["suppressed"].iloc[0]):
                cells.append('<td><span class="cell off">&lt; min</span></td>')
                continue
            r = cell.iloc[0]
            alpha = 0.25 + 0.75 * float(r["shown_share"]) / peak
            rgb = _rgb01(r)
            ink = _ink_on(rgb) if alpha > 0.6 else "#1d1d1f"
            best = " best" if int(r["shown_rank"]) == 1 else ""
            cells.append(f'<td><span class="cell{best}" style="background:rgba({int(r["rep_r"])},{int(r["rep_g"])},'
                         f'{int(r["rep_b"])},{alpha:.2f});color:{ink}">{_pct(r["shown_share"])}</span></td>')
        body.append(f'<tr><td class="cname"><span class="sw" style="background:{_hex(first)};width:22px;height:16px">'
                    f'</span> <b>{_e(first["color_name_zh"])}</b> {_e(first["color_name"])}</td>{"".join(cells)}</tr>')
    figure = f'<div class="figure"><img src="{_e(chart)}" alt="shares per cohort"></div>' if chart else ""
    return ('<h2>Cohorts compared</h2><p class="note">Each cohort\'s top colours side by side (outlined: the cohort\'s '
            'most worn colour; "&lt; min": too few persons to publish).</p>'
            f'<div class="scroll"><table class="grid-compare">{head}{"".join(body)}</table></div>{figure}')


def _ages(buckets: dict[str, pd.DataFrame], chart: str | None) -> str:
    if not buckets:
        return ""
    rows = []
    for label, part in buckets.items():
        top = _published(part).head(3)
        colours = "".join(f'<span class="pill"><span class="sw" style="background:{_hex(r)};width:18px;height:14px">'
                          f'</span> {_e(r["color_name_zh"])} {_e(r["color_name"])} '
                          f'<b>{_pct(r["shown_share"])}</b></span>'
                          for _, r in top.iterrows()) or "–"
        rows.append(f'<tr><td class="nowrap">{_e(label)}</td><td class="num">{_int(part["group_persons"].iloc[0])}</td>'
                    f"<td>{colours}</td></tr>")
    figure = f'<div class="figure"><img src="{_e(chart)}" alt="shares per age bucket"></div>' if chart else ""
    return ('<h2>By age</h2><p class="note">The same statistics by estimated age at the time of the photo.</p>'
            f'{figure}<table class="ages"><tr><th>age</th><th class="num">persons</th><th>top colours</th></tr>'
            f'{"".join(rows)}</table>')


def _method(settings: HistogramSettings, has_sales: bool) -> str:
    items = [
        ("Persons", ("each measured person once (same photo under several names counted once), faces that passed "
                     "the quality filters only")),
        ("Cohort", "birth year = photo year − age rounded to whole years; " + ", ".join(
            f"{label} {first}–{last}" for label, first, last in settings.cohorts)),
        ("Colour", f"the {settings.colour} garment colour, binned "
                   + ("to the nearest named colour (CIEDE2000)" if settings.bins == "palette"
                      else f"on a {settings.grid_step:g}-unit CIELAB grid")
                   + "; swatches show the median CIELAB colour of the persons in the cell"),
        ("Interval", (f"{settings.ci:.0%} percentile bootstrap over persons, {settings.bootstrap:,} resamples, "
                      f"seed {settings.seed}")),
        ("Suppression", f"cells with fewer than {settings.min_persons} persons are not published"),
        ("Corrected share", "deconvolution of the age error: one colour distribution per cohort, fitted to the "
                            "persons' colours and estimated ages and pulled towards its birth-year neighbours' by "
                            f"{settings.correction_smoothing:g} persons; interval: bootstrap of the unpenalised fit "
                            "over the persons and the calibration's labelled faces; error measured on "
                            + (f"{Path(settings.age_calibration_path).name}" if settings.age_calibration_path
                               else "the default age model's validation faces (shipped)")),
    ]
    if has_sales:
        items.append(("Sales blend", (f"blend = {1 - settings.sales_weight:.2f} × photo share + "
                                      f"{settings.sales_weight:.2f} × sales share, ranked per cohort")))
    rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in items)
    return f'<h2>Method</h2><table class="kv">{rows}</table>'


def _samples(counts: dict[str, Any]) -> str:
    status = "".join(f'<tr><td>{_e(s)}</td><td class="num">{n:,}</td></tr>' for s, n in counts["by_status"])
    people = [("faces detected", counts["faces"]), ("faces passing quality filters", counts["faces_ok"]),
              ("persons measured (garments)", counts["measured"]), ("persons counted", counts["counted"]),
              ("persons in a cohort", counts["in_cohorts"])]
    rows = "".join(f'<tr><td>{_e(k)}</td><td class="num">{_int(v)}</td></tr>' for k, v in people if v is not None)
    return ('<h2>Sample</h2><div class="two">'
            f'<table class="kv"><tr><th>photos by status</th><th class="num">{counts["photos"]:,}</th></tr>'
            f'{status}</table><table class="kv"><tr><th>people</th><th></th></tr>{rows}</table></div>')


def _run(run_info: dict[str, Any]) -> str:
    scalars = {k: v for k, v in run_info.items() if not isinstance(v, (dict, list, tuple)) and k != "config"}
    rows = "".join(f'<tr><td>{_e(k)}</td><td class="code">{_e(v)}</td></tr>' for k, v in scalars.items())
    out = ['<h2>Run</h2>', f'<table class="kv">{rows}</table>' if rows else ""]
    for key, value in run_info.items():
        if key == "config" or not isinstance(value, (dict, list, tuple)):
            continue
        flat = _flatten(value)
        body = "".join(f'<tr><td class="code">{_e(k)}</td><td class="code">{_e(v)}</td></tr>' for k, v in flat)
        out.append(f'<h3 style="margin-top:18px">{_e(key)}</h3><table class="kv">{body}</table>')
    if "config" in run_info:
        text = json.dumps(run_info["config"], indent=2, ensure_ascii=False, sort_keys=False, default=str)
        out.append(f"<details><summary>Resolved configuration</summary><pre>{_e(text)}</pre></details>")
    return "".join(out)


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        items = []
        for k, v in value.items():
            items += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return items
    if isinstance(value, (list, tuple)) and prefix == "":
        return [(str(i), v) for i, v in enumerate(value)]
    return [(prefix, json.dumps(value, ensure_ascii=False, default=str) if isinstance(value, (list, tuple)) else value)]


