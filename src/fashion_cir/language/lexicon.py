"""The words for attribute values, in one place: what a caption may say for a value (read by
:mod:`.changes`), and the orders that make "shorter", "longer", "darker" meaningful. Values are
those of the default vocabulary (:mod:`fashion_cir.captioning.vocab`)."""

from __future__ import annotations

LENGTH_ORDER = ("cropped", "hip", "thigh", "knee", "midi", "ankle", "full")
SLEEVE_ORDER = ("sleeveless", "short", "three-quarter", "long")

# phrase -> value, per attribute; the reader tries longer phrases first
PHRASES: dict[str, dict[str, str]] = {
    "category": {
        "t shirt": "t-shirt", "tshirt": "t-shirt", "tee": "t-shirt", "long sleeve top": "longsleeve",
        "long sleeved top": "longsleeve", "long sleeve shirt": "longsleeve", "longsleeve": "longsleeve",
        "shirt": "shirt", "button down": "shirt", "button up shirt": "shirt", "polo": "polo", "blouse": "blouse",
        "top": "top", "tank top": "top", "crop top": "top", "undershirt": "undershirt", "vest top": "undershirt",
        "tank": "undershirt", "dress": "dress", "skirt": "skirt", "pants": "pants", "trousers": "pants",
        "jeans": "pants", "leggings": "pants", "joggers": "pants", "sweatpants": "pants", "chinos": "pants",
        "shorts": "shorts", "jacket": "outwear", "coat": "outwear", "parka": "outwear", "vest": "outwear",
        "blazer": "blazer", "hoodie": "hoodie", "sweatshirt": "sweater", "sweater": "sweater", "jumper": "sweater",
        "pullover": "sweater", "cardigan": "sweater", "hat": "hat", "cap": "hat", "beanie": "hat",
        "shoes": "shoes", "shoe": "shoes", "sneakers": "shoes", "trainers": "shoes", "boots": "shoes",
        "sandals": "shoes", "heels": "shoes", "loafers": "shoes", "bodysuit": "body", "onesie": "body",
        "romper": "body", "bag": "bag",
    },
    "color": {
        "black": "black", "white": "white", "off white": "white", "ivory": "white", "grey": "grey", "gray": "grey",
        "charcoal": "grey", "silver": "grey", "heather grey": "grey", "beige": "beige", "cream": "beige",
        "tan": "beige", "khaki": "beige", "camel": "beige", "sand": "beige", "brown": "brown", "chocolate": "brown",
        "red": "red", "maroon": "red", "burgundy": "red", "wine": "red", "crimson": "red", "coral": "red",
        "pink": "pink", "magenta": "pink", "fuchsia": "pink", "rose": "pink", "orange": "orange", "rust": "orange",
        "yellow": "yellow", "mustard": "yellow", "gold": "yellow", "green": "green", "lime": "green",
        "mint": "green", "teal": "green", "emerald": "green", "sage": "green", "olive": "olive", "khaki green": "olive",
        "army green": "olive", "blue": "blue", "royal blue": "blue", "cobalt": "blue", "denim blue": "blue",
        "navy": "navy", "navy blue": "navy", "dark blue": "navy", "midnight blue": "navy", "darker blue": "navy",
        "deep blue": "navy", "light blue": "light blue", "sky blue": "light blue", "baby blue": "light blue",
        "pale blue": "light blue", "powder blue": "light blue", "lighter blue": "light blue",
        "faded blue": "light blue", "turquoise": "light blue", "purple": "purple", "violet": "purple",
        "lilac": "purple", "lavender": "purple", "plum": "purple", "multicolor": "multicolor",
        "multicolored": "multicolor", "multicoloured": "multicolor", "colorful": "multicolor",
        "colourful": "multicolor", "rainbow": "multicolor",
    },
    "pattern": {
        "solid": "solid", "plain": "solid", "striped": "striped", "stripes": "striped", "stripe": "striped",
        "stripy": "striped", "pinstripe": "striped", "checked": "checked", "check": "checked", "plaid": "checked",
        "tartan": "checked", "gingham": "checked", "checkered": "checked", "floral": "floral", "flowers": "floral",
        "flowery": "floral", "flower": "floral", "dotted": "dotted", "polka dot": "dotted", "polka dots": "dotted",
        "dots": "dotted", "spotted": "dotted", "camouflage": "camouflage", "camo": "camouflage",
        "animal print": "animal print", "leopard": "animal print", "zebra": "animal print", "snake": "animal print",
        "text": "text print", "lettering": "text print", "letters": "text print", "writing": "text print",
        "words": "text print", "slogan": "text print", "logo": "text print", "text print": "text print",
        "graphic": "graphic print", "graphic print": "graphic print", "print": "graphic print",
        "printed": "graphic print", "picture": "graphic print", "image": "graphic print", "design": "graphic print",
    },
    "sleeves": {
        "long sleeves": "long", "long sleeved": "long", "long sleeve": "long", "longer sleeves": "long",
        "short sleeves": "short", "short sleeved": "short", "short sleeve": "short", "shorter sleeves": "short",
        "sleeveless": "sleeveless", "no sleeves": "sleeveless", "without sleeves": "sleeveless",
        "three quarter sleeves": "three-quarter", "3/4 sleeves": "three-quarter",
    },
    "neckline": {
        "v neck": "v-neck", "v neckline": "v-neck", "vneck": "v-neck", "hood": "hood", "hooded": "hood",
        "collar": "collar", "collared": "collar", "turtleneck": "turtleneck", "turtle neck": "turtleneck",
        "high neck": "turtleneck", "mock neck": "turtleneck", "crew neck": "crew", "crewneck": "crew",
        "round neck": "crew", "scoop neck": "scoop", "scoop": "scoop", "strapless": "strapless",
    },
    "length": {
        "cropped": "cropped", "crop": "cropped", "hip length": "hip", "thigh length": "thigh", "mini": "thigh",
        "knee length": "knee", "knee": "knee", "midi": "midi", "ankle length": "ankle", "ankle": "ankle",
        "full length": "full", "floor length": "full", "maxi": "full",
    },
    "material": {
        "denim": "denim", "jean": "denim", "knit": "knit", "knitted": "knit", "cable knit": "knit",
        "ribbed": "knit", "cotton": "cotton", "jersey": "cotton", "leather": "leather", "faux leather": "leather",
        "suede": "leather", "fleece": "fleece", "wool": "wool", "woolen": "wool", "woollen": "wool",
        "puffer": "puffer", "quilted": "puffer", "padded": "puffer", "lace": "lace", "lacy": "lace",
        "satin": "satin", "silk": "satin", "silky": "satin", "shiny": "satin", "polyester": "synthetic",
        "nylon": "synthetic",
    },
    "closure": {
        "zip": "zip", "zipper": "zip", "zipped": "zip", "zip up": "zip", "zippered": "zip", "buttons": "buttons",
        "button": "buttons", "buttoned": "buttons", "button front": "buttons", "laces": "laces", "lace up": "laces",
        "laced": "laces",
    },
}

# pattern words that name a kind of print only loosely: used when no more specific word is there
GENERIC_PATTERNS = {"print", "printed", "design", "picture", "image", "graphic"}
# nouns that make a colour right before them a detail's colour, not the garment's ("grey stripes")
DETAIL_NOUNS = {
    "stripe", "stripes", "print", "text", "logo", "logos", "lettering", "letters", "writing", "accent", "accents",
    "trim", "trims", "detail", "details", "detailing", "band", "bands", "panel", "panels", "sole", "soles",
    "collar", "cuffs", "cuff", "piping", "graphic", "graphics", "pattern", "dots", "flowers", "yoke", "shoulders",
    "sleeves", "straps", "strap", "laces", "buttons", "zip", "zipper", "pocket", "pockets", "hood", "lining",
    "design", "checks", "letter", "words", "border", "edges", "edging", "stitching", "toe", "heel",
}
# words that put the values after them out of the wanted target ("no hood", "instead of white")
NEGATIONS = ("instead of", "rather than", "no longer", "unlike", "without", "not", "no", "minus", "less")
# the end of a negation's scope
SCOPE_ENDS = {"and", "but", "with", "has", "have", "is", "are", "in"}
RELATIVE_WORDS = {"shorter": ("length", "<"), "longer": ("length", ">")}
