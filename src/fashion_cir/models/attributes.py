"""Attribute heads: one small linear classifier per vocabulary attribute on a model's image
features, trained on the catalog's MLLM attributes, so that an image without a description (an
upload) still gets one: ``predict`` -> values with confidences -> ``describe`` -> a phrase read
the way attributes.jsonl descriptions read ("a red long-sleeve cotton dress with a v-neck").

Saved beside ``model.json`` as ``attributes.pt`` (weights) + ``attributes.json`` (classes,
training settings, val metrics); :meth:`CIRModel.load` picks them up when present."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..captioning.vocab import DEFAULT_VOCABULARY, Vocabulary
from ..config import Config
from ..errors import ModelError, one_line
from ..io import read_json, write_json

HEADS_WEIGHTS = "attributes.pt"
HEADS_FILE = "attributes.json"
KIDS = "kids"
# attributes left out of a description below this confidence (category and colour always stay)
DESCRIBE_MIN_CONFIDENCE = 0.5

Value = str | bool | None


def attribute_classes(vocab: Vocabulary = DEFAULT_VOCABULARY) -> dict[str, list[Value]]:
    """Class list per head: the vocabulary's values (+ None for nullable ones) and kids False/True."""
    classes: dict[str, list[Value]] = {}
    for name, spec in vocab.attributes.items():
        classes[name] = [*spec.values, *([None] if spec.nullable else [])]
    classes[KIDS] = [False, True]
    return classes


class AttributeHeads(nn.Module):
    """Linear heads over L2-normalised image features, one per attribute."""

    def __init__(self, feature_dim: int, classes: Mapping[str, list[Value]], info: dict[str, Any] | None = None):
        super().__init__()
        self.feature_dim = feature_dim
        self.classes = {name: list(values) for name, values in classes.items()}
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, len(values)) for name, values in self.classes.items()})
        self.info = dict(info or {})

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Class probabilities per attribute for raw image features [N, d]."""
        x = F.normalize(features.float(), dim=-1)
        return {name: head(x).softmax(-1) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, features: torch.Tensor | np.ndarray) -> list[dict[str, dict[str, Any]]]:
        """Per image: ``{attribute: {"value": ..., "confidence": p}}`` (the most likely class)."""
        features = torch.as_tensor(np.asarray(features, dtype=np.float32)).reshape(-1, self.feature_dim)
        probs = self(features.to(next(self.parameters()).device))
        out: list[dict[str, dict[str, Any]]] = [{} for _ in range(len(features))]
        for name, p in probs.items():
            confidence, index = p.max(-1)
            for row, (c, i) in enumerate(zip(confidence.tolist(), index.tolist())):
                out[row][name] = {"value": self.classes[name][i], "confidence": round(float(c), 4)}
        return out

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{HEADS_WEIGHTS}.tmp"
        torch.save({k: v.detach().cpu() for k, v in self.state_dict().items()}, tmp)
        tmp.replace(folder / HEADS_WEIGHTS)
        write_json(
            folder / HEADS_FILE,
            {
                "format": "fashion-cir-attributes/1",
                "feature_dim": self.feature_dim,
                "classes": self.classes,
                **self.info,
            },
        )

    @classmethod
    def load(cls, folder: str | Path) -> AttributeHeads:
        folder = Path(folder)
        meta = read_json(folder / HEADS_FILE, "attribute heads file")
        for key in ("feature_dim", "classes"):
            if key not in meta:
                raise ModelError(f"{folder / HEADS_FILE}: missing field {key!r}")
        info = {k: v for k, v in meta.items() if k not in ("format", "feature_dim", "classes")}
        heads = cls(int(meta["feature_dim"]), meta["classes"], info)
        try:
            state = torch.load(folder / HEADS_WEIGHTS, map_location="cpu", weights_only=True)
            heads.load_state_dict(state)
        except FileNotFoundError as exc:
            raise ModelError(f"{folder}: {HEADS_FILE} without its weights file {HEADS_WEIGHTS}") from exc
        except Exception as exc:
            raise ModelError(
                f"corrupt or mismatched attribute weights {folder / HEADS_WEIGHTS}: {one_line(exc)}"
            ) from exc
        return heads.eval()


def load_heads(folder: str | Path) -> AttributeHeads | None:
    """The heads saved in a model folder, or None when it has none."""
    return AttributeHeads.load(folder) if (Path(folder) / HEADS_FILE).is_file() else None


# -- training ------------------------------------------------------------------------------------
class HeadsConfig(Config):
    """Attribute-head training: weight decays tried (selected on val), steps, validation interval."""

    weight_decays: tuple[float, ...] = (0.0, 1e-4, 1e-3)
    steps: int = 300
    check_every: int = 25
    lr: float = 0.05
    seed: int = 0


def _labels(records: Mapping[str, Mapping[str, Any]], ids: list[str], name: str, classes: list[Value]) -> np.ndarray:
    """Class index per id (-1: no usable label)."""
    lookup = {value: i for i, value in enumerate(classes)}
    return np.array([lookup.get(records[i].get(name), -1) for i in ids], dtype=np.int64)


def scores(true: np.ndarray, pred: np.ndarray, n_classes: int) -> dict[str, float]:
    """Accuracy and macro-F1 (over the classes present in ``true`` or ``pred``), in percent."""
    if len(true) == 0:
        return {"accuracy": 0.0, "macro_f1": 0.0}
    f1s = []
    for c in range(n_classes):
        tp = int(np.sum((pred == c) & (true == c)))
        fp = int(np.sum((pred == c) & (true != c)))
        fn = int(np.sum((pred != c) & (true == c)))
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": 100.0 * float(np.mean(true == pred)), "macro_f1": 100.0 * float(np.mean(f1s))}


def train_heads(
    train_features: np.ndarray,
    train_records: list[Mapping[str, Any]],
    val_features: np.ndarray,
    val_records: list[Mapping[str, Any]],
    vocab: Vocabulary = DEFAULT_VOCABULARY,
    config: HeadsConfig | None = None,
) -> AttributeHeads:
    """Full-batch logistic regression per attribute; each head keeps the weight decay and step
    count with its best val accuracy. All heads train together as one linear layer (the heads
    share no weights, so this equals training them one by one). ``info["val"]`` holds accuracy and
    macro-F1 per attribute beside the majority-class baseline (the train split's commonest value)."""
    config = config or HeadsConfig()
    classes = attribute_classes(vocab)
    names = list(classes)
    heads = AttributeHeads(train_features.shape[1], classes)
    x_train = F.normalize(torch.from_numpy(np.asarray(train_features, dtype=np.float32)), dim=-1)
    x_val = F.normalize(torch.from_numpy(np.asarray(val_features, dtype=np.float32)), dim=-1)
    train_map = {str(i): r for i, r in enumerate(train_records)}
    val_map = {str(i): r for i, r in enumerate(val_records)}
    y_train = {n: torch.from_numpy(_labels(train_map, list(train_map), n, classes[n])) for n in names}
    y_val = {n: _labels(val_map, list(val_map), n, classes[n]) for n in names}
    for name in names:
        if not (y_train[name] >= 0).any() or not (y_val[name] >= 0).any():
            raise ModelError(f"no usable {name!r} labels in the training or validation attributes")
    bounds = np.cumsum([0] + [len(classes[n]) for n in names])
    slices = {n: slice(int(bounds[i]), int(bounds[i + 1])) for i, n in enumerate(names)}
    best: dict[str, tuple[float, dict[str, torch.Tensor], dict[str, Any]]] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny full-batch steps: one thread is fastest, and fair to a shared CPU
    try:
        for wd in config.weight_decays:
            torch.manual_seed(config.seed)
            layer = nn.Linear(x_train.shape[1], int(bounds[-1]))
            optimiser = torch.optim.Adam(layer.parameters(), lr=config.lr, weight_decay=wd)
            for step in range(1, config.steps + 1):
                optimiser.zero_grad()
                logits = layer(x_train) * 10.0  # normalised features are small; a fixed scale speeds convergence
                losses = [F.cross_entropy(logits[:, slices[n]], y_train[n], ignore_index=-1) for n in names]
                loss = sum(losses[1:], losses[0])
                loss.backward()
                optimiser.step()
                if step % config.check_every:
                    continue
                with torch.no_grad():
                    val_logits = layer(x_val)
                for n in names:
                    keep = y_val[n] >= 0
                    pred = val_logits[:, slices[n]].argmax(-1).numpy()[keep]
                    metric = scores(y_val[n][keep], pred, len(classes[n]))
                    if n not in best or metric["accuracy"] > best[n][0]:
                        state = {
                            "weight": layer.weight[slices[n]].detach() * 10.0,
                            "bias": layer.bias[slices[n]].detach() * 10.0,
                        }
                        best[n] = (metric["accuracy"], state, {**metric, "weight_decay": wd, "steps": step})
    finally:
        torch.set_num_threads(threads)
    report: dict[str, dict[str, Any]] = {}
    for n in names:
        heads.heads[n].load_state_dict(best[n][1])
        known_train = y_train[n][y_train[n] >= 0]
        known_val = y_val[n][y_val[n] >= 0]
        majority = Counter(known_train.tolist()).most_common(1)[0][0]
        baseline = scores(known_val, np.full_like(known_val, majority), len(classes[n]))
        report[n] = {
            **best[n][2],
            "majority": classes[n][majority],
            "majority_accuracy": baseline["accuracy"],
            "majority_macro_f1": baseline["macro_f1"],
            "n_train": len(known_train),
            "n_val": len(known_val),
        }
    heads.info = {"config": config.model_dump(mode="json"), "val": report}
    return heads.eval()


# -- descriptions ----------------------------------------------------------------------------------
PAIRS = {"pants", "shorts", "shoes"}
NOUN = {
    "longsleeve": "long-sleeve top",
    "outwear": "jacket",
    "body": "bodysuit",
    "other": "garment",
    "undershirt": "vest top",
    "polo": "polo shirt",
}
PATTERN_WORD = {
    "striped": "striped",
    "checked": "checked",
    "floral": "floral",
    "dotted": "polka dot",
    "camouflage": "camouflage",
    "animal print": "animal print",
    "other": "patterned",
}
PRINT_WORD = {"graphic print": "a graphic print", "text print": "a text print"}
SLEEVE_WORD = {
    "short": "short-sleeve",
    "long": "long-sleeve",
    "three-quarter": "three-quarter sleeve",
    "sleeveless": "sleeveless",
}
MATERIAL_WORD = {
    "denim": "denim",
    "knit": "knit",
    "cotton": "cotton",
    "leather": "leather",
    "fleece": "fleece",
    "wool": "wool",
    "puffer": "quilted",
    "lace": "lace",
    "satin": "satin",
}
NECK_WORD = {"v-neck": "a v-neck", "collar": "a collar", "hood": "a hood", "turtleneck": "a turtleneck"}
CLOSURE_WORD = {"zip": "zip-up", "buttons": "button-front"}
SLEEVED = {"t-shirt", "shirt", "polo", "blouse", "top", "dress", "outwear", "blazer", "hoodie", "sweater", "body"}


def describe(attributes: Mapping[str, Any], min_confidence: float = DESCRIBE_MIN_CONFIDENCE) -> str:
    """A description from predicted attributes (``{name: {"value", "confidence"}}``) or plain
    values (``{name: value}``), e.g. "a navy and white striped long-sleeve cotton shirt with a collar".
    Uncertain attributes are left out; category and colour always appear."""

    def value(name: str, always: bool = False) -> Any:
        entry = attributes.get(name)
        if isinstance(entry, Mapping):
            return entry.get("value") if always or entry.get("confidence", 1.0) >= min_confidence else None
        return entry

    category = value("category", True) or "other"
    color, second, pattern = value("color", True), value("secondary_color"), value("pattern")
    words = []
    if value(KIDS) is True:
        words.append("child's")
    if value("closure") in CLOSURE_WORD and category in {"outwear", "hoodie", "sweater", "shirt", "blazer"}:
        words.append(CLOSURE_WORD[value("closure")])
    colors = color or ""
    if color and second and second not in (color, "multicolor") and pattern in PATTERN_WORD:  # "navy and white striped"
        colors = f"{color} and {second}"
    if colors:
        words.append(colors)
    if pattern in PATTERN_WORD:
        words.append(PATTERN_WORD[pattern])
    if value("sleeves") in SLEEVE_WORD and category in SLEEVED:
        words.append(SLEEVE_WORD[value("sleeves")])
    if value("material") in MATERIAL_WORD:
        words.append(MATERIAL_WORD[value("material")])
    words.append(NOUN.get(category, category))
    extras = [PRINT_WORD[pattern]] if pattern in PRINT_WORD else []
    if value("neckline") in NECK_WORD and category in SLEEVED:
        extras.append(NECK_WORD[value("neckline")])
    phrase = " ".join(words)
    if value(KIDS) is True:
        article = "a"
    else:
        article = "a pair of" if category in PAIRS else ("an" if phrase[:1] in "aeiou" else "a")
    text = f"{article} {phrase}"
    return text + (" with " + " and ".join(extras) if extras else "")
