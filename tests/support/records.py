"""An MLLM attribute record that passes the default vocabulary: what a good captioning answer holds
(the fake OpenAI server answers it; the parser tests bend it)."""

RED_TSHIRT = {
    "category": "t-shirt",
    "color": "red",
    "secondary_color": None,
    "pattern": "solid",
    "sleeves": "short",
    "neckline": "crew",
    "length": "hip",
    "material": "cotton",
    "closure": "none",
    "kids": False,
    "description": "a plain red short-sleeve cotton t-shirt with a crew neck",
}
