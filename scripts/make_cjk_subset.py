"""Build the CJK subset font the report and `explain` use on machines without a Chinese font.

The glyphs are those of every Chinese colour name, the default cohort labels and the report's own Chinese text,
cut from Noto Sans CJK SC (SIL Open Font License 1.1, Debian's fonts-noto-cjk):

    python scripts/make_cjk_subset.py /usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc
"""
from __future__ import annotations

import sys
from pathlib import Path

from fontTools import subset
from fontTools.ttLib import TTCollection

from colortrend.aggregate.histograms import DEFAULT_COHORTS
from colortrend.color.names import NAMED_COLORS
from colortrend.aggregate.report import CJK_SUBSET

EXTRA = "后度黑年龄出生色颜"  # 95度黑 and words a cohort label or report text may use


def main(source: str) -> None:
    fonts = TTCollection(source).fonts
    number = next(i for i, f in enumerate(fonts) if "CJK SC" in f["name"].getDebugName(1))
    text = "".join(c.zh for c in NAMED_COLORS) + "".join(label for label, _, _ in DEFAULT_COHORTS) + EXTRA
    glyphs = "".join(sorted({ch for ch in text if ord(ch) > 0x2E80}))
    options = subset.Options()
    options.font_number = number
    options.name_IDs = ["*"]  # keep the licence and the family name
    options.layout_features = []
    font = subset.load_font(source, options)
    subsetter = subset.Subsetter(options)
    subsetter.populate(text=glyphs)
    subsetter.subset(font)
    Path(CJK_SUBSET).parent.mkdir(parents=True, exist_ok=True)
    subset.save_font(font, str(CJK_SUBSET), options)
    print(f"{CJK_SUBSET}: {len(glyphs)} glyphs, {CJK_SUBSET.stat().st_size:,} bytes")


if __name__ == "__main__":
    main(sys.argv[1])
