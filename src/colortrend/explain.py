"""``colortrend explain PHOTO``: one photo through the whole chain, drawn so a person can check every number.

Face boxes with their age, each person's garment mask outlined by part (upper / lower), and the palette swatches
with shares and the colour's name. Nothing is written to the output dataset.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from colortrend.config import Config
from colortrend.errors import ConfigError
from colortrend.io.discover import photo_id_for

PART_OUTLINES = {"upper": (255, 0, 255), "lower": (0, 255, 255)}


def analyse_photo(path: str, cfg: Config) -> dict:
    """Run every per-photo stage on one file; returns the batch (one photo) with all columns."""
    from colortrend.models import pick_device
    from colortrend.pipeline import build_stages, new_batch, run_chain

    path = os.path.abspath(path)
    return run_chain(build_stages(cfg, pick_device(cfg.device)), new_batch([path], [photo_id_for(path)]))


def explain(path: str, cfg: Config, out_png: str | None = None) -> tuple[str, list[dict]]:
    """Draw the analysis of one photo to ``out_png`` (default: next to the photo name, ``<stem>.explain.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from colortrend.models.parse_classes import PARSE_CLASSES

    batch = analyse_photo(path, cfg)
    out_png = out_png or str(Path(path).with_suffix("").name + ".explain.png")
    image = batch["image"][0]
    if image is None or batch["status"][0] not in ("ok", "no_face"):
        raise ConfigError(f"{path}: {batch['status'][0]}: {batch['error'][0]}")
    n = int(batch["n_faces"][0])
    people = _people(batch, n)
    parses = (batch.get("person_parse") or [None])[0] or [None] * n
    outlined = _outline_garments(image, parses, PARSE_CLASSES)

    from colortrend.aggregate.report import _cjk_font

    font = _cjk_font()
    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)  # a CJK font without "normal" weight warns
    rows = max(1, len(people))
    with matplotlib.rc_context({"font.family": [font, "DejaVu Sans"] if font else ["DejaVu Sans"]}):
        fig = plt.figure(figsize=(12, max(6.0, 1.5 * rows + 2)), dpi=110)
        ax = fig.add_axes([0.01, 0.02, 0.5, 0.93])
        ax.imshow(outlined)
        ax.set_axis_off()
        ax.set_title(f"{Path(path).name}: {batch['status'][0]}, {n} face(s); outlines: upper (magenta), lower (cyan)",
                     fontsize=9, loc="left")
        for j, person in enumerate(people):
            x1, y1, x2, y2 = person["box"]
            ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=1.5, ec="yellow"))
            ax.text(x1, y1 - 4, f"#{j} {person['age_text']}", color="black", fontsize=8,
                    bbox={"fc": "yellow", "ec": "none", "pad": 1})
        for j, person in enumerate(people):
            pax = fig.add_axes([0.55, 0.95 - (j + 1) * 0.9 / rows, 0.43, 0.9 / rows * 0.8])
            _draw_palette(pax, j, person)
        fig.savefig(out_png)
        plt.close(fig)
    return out_png, people


def _outline_garments(image: np.ndarray, parses: list, classes: tuple[str, ...]) -> np.ndarray:
    """The photo with each person's upper/lower garment outlined: the colours underneath stay visible."""
    import cv2

    out = image.copy()
    for parse in parses:
        if parse is None:
            continue
        x0, y0, labels = parse
        for part, colour in PART_OUTLINES.items():
            mask = (labels == classes.index(part)).astype(np.uint8)
            contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(out, contours, -1, colour, max(1, image.shape[1] // 400), offset=(int(x0), int(y0)))
    return out


def _people(batch: dict, n: int) -> list[dict]:
    def face(col, j, default=None):
        values = batch.get(col, [None])[0]
        return default if values is None or len(values) <= j else values[j]

    people = []
    for j in range(n):
        age, sd = face("age", j), face("age_sd", j)
        reason = face("filter_reason", j)
        people.append({
            "box": [float(face(c, j, 0)) for c in ("box_x1", "box_y1", "box_x2", "box_y2")],
            "age": None if age is None else float(age),
            "age_text": ("age ?" if age is None else f"{age:.0f}±{sd:.0f} y" if sd is not None else f"{age:.0f} y")
            + (f" ({reason})" if reason else ""),
            "palette": face("palette", j) or [],
            "dominant": None if face("dominant_r", j) is None else
            tuple(int(face(c, j)) for c in ("dominant_r", "dominant_g", "dominant_b")),
            "upper": _rgb(face, "upper", j),
            "lower": _rgb(face, "lower", j),
            "name": face("color_name", j),
            "name_zh": face("color_name_zh", j),
        })
    return people


def _rgb(face, part: str, j: int) -> tuple[int, int, int] | None:
    values = [face(f"{part}_{c}", j) for c in "rgb"]
    return None if any(v is None for v in values) else tuple(int(v) for v in values)


def _draw_palette(ax, j: int, person: dict) -> None:
    from matplotlib.patches import Rectangle

    ax.set_axis_off()
    palette = person["palette"]
    if not palette:
        ax.text(0, 0.5, f"#{j}: no garment measured", fontsize=9, va="center")
        return
    left = 0.0
    for colour in palette:
        rgb = np.array([colour["r"], colour["g"], colour["b"]]) / 255
        ax.add_patch(Rectangle((left, 0.25), colour["share"], 0.5, fc=rgb, ec="white"))
        if colour["share"] > 0.12:
            ax.text(left + 0.01, 0.12, f"{colour['share']:.0%}", fontsize=7)
        left += colour["share"]
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    r, g, b = person["dominant"] or (0, 0, 0)
    name = f"{person['name']} {person['name_zh']}" if person["name"] else ""
    parts = "  ".join(f"{part} {'/'.join(map(str, person[part]))}" for part in ("upper", "lower") if person[part])
    ax.text(0, 0.85, f"#{j} dominant {name}  RGB {r}/{g}/{b}   {parts}", fontsize=9)
