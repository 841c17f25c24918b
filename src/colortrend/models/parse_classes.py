"""The garment parser's class vocabulary and how Clothing Co-Parsing (CCP) labels map onto it; no torch here.

Stages, evaluation, training and scripts all read these names and ids, so they live apart from the network: a
module that only needs to know which class is ``upper`` does not pay for importing torch.

``PARSE_CLASSES`` is what the network predicts; ``CCP_TO_PARSE`` maps the 59 CCP classes onto it. One-piece
garments (dress, romper, suit, swimwear, bodysuit, intimate) cannot be split at the waist from CCP's labels, so each
goes to the class of the body part it mostly covers: dresses and rompers to ``lower`` (the issue's "lower garment /
dress"), suits (jacket-led), bodysuits, intimates and swimwear to ``upper``. Items the data README calls ambiguous
(hat, scarf, tie, gloves, socks, stockings, tights, belt, accessories) are neither garment nor background: they map
to ``IGNORE`` and train nothing.
"""
from __future__ import annotations

import numpy as np

PARSE_CLASSES = ("background", "skin", "hair", "upper", "lower", "shoes", "accessory")
BACKGROUND, SKIN, HAIR, UPPER, LOWER, SHOES, ACCESSORY = range(len(PARSE_CLASSES))
GARMENT_CLASSES = (UPPER, LOWER)
#: Whether each label value 0-255 is a garment class: ``IS_GARMENT[labels]`` is a label map's garment mask (a table
#: lookup, several times faster than ``np.isin`` on every pixel).
IS_GARMENT = np.isin(np.arange(256), GARMENT_CLASSES)
#: Label value that contributes nothing to the loss (ambiguous CCP classes, pixels outside the photo).
IGNORE = 255

#: Clothing Co-Parsing's class names by label id (its ``classes.csv``): the ids CCP-style masks hold.
CCP_CLASSES = (
    "null", "accessories", "bag", "belt", "blazer", "blouse", "bodysuit", "boots", "bra", "bracelet", "cape",
    "cardigan", "clogs", "coat", "dress", "earrings", "flats", "glasses", "gloves", "hair", "hat", "heels", "hoodie",
    "intimate", "jacket", "jeans", "jumper", "leggings", "loafers", "necklace", "panties", "pants", "pumps", "purse",
    "ring", "romper", "sandals", "scarf", "shirt", "shoes", "shorts", "skin", "skirt", "sneakers", "socks",
    "stockings", "suit", "sunglasses", "sweater", "sweatshirt", "swimwear", "t-shirt", "tie", "tights", "top", "vest",
    "wallet", "watch", "wedges",
)
#: Our class of each CCP class name; every CCP class appears exactly once.
CCP_TO_PARSE: dict[str, int] = {
    "null": BACKGROUND,
    "skin": SKIN,
    "hair": HAIR,
    **dict.fromkeys(
        ("blazer", "blouse", "bodysuit", "bra", "cape", "cardigan", "coat", "hoodie", "intimate", "jacket", "jumper",
         "shirt", "suit", "sweater", "sweatshirt", "swimwear", "t-shirt", "top", "vest"), UPPER),
    **dict.fromkeys(("dress", "jeans", "leggings", "panties", "pants", "romper", "shorts", "skirt"), LOWER),
    **dict.fromkeys(
        ("boots", "clogs", "flats", "heels", "loafers", "pumps", "sandals", "shoes", "sneakers", "wedges"), SHOES),
    **dict.fromkeys(
        ("bag", "bracelet", "earrings", "glasses", "necklace", "purse", "ring", "sunglasses", "wallet", "watch"),
        ACCESSORY),
    **dict.fromkeys(
        ("accessories", "belt", "gloves", "hat", "scarf", "socks", "stockings", "tie", "tights"), IGNORE),
}


def ccp_lookup() -> np.ndarray:
    """256-entry table taking CCP label ids to PARSE_CLASSES ids (IGNORE for ambiguous and unknown ids)."""
    lut = np.full(256, IGNORE, np.uint8)
    lut[:len(CCP_CLASSES)] = [CCP_TO_PARSE[name] for name in CCP_CLASSES]
    return lut
