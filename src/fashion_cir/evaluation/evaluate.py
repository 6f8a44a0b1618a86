"""Evaluate a CIR model on FashionIQ-format triplet sets, under one or more protocols at once.

A protocol says what the gallery is and whether the reference leaves it: FashionIQ's ``split``
protocol ranks each set's own gallery with the reference kept; the ``catalog`` protocol ranks the
whole catalog with the reference removed (what the service does); CIRR removes the reference from
the set's gallery. A set's queries are composed once and scored against the union of its
protocols' galleries, so a second protocol costs one matrix product. Per set: R@K, overall =
(R@10 + R@50) / 2 and, with ``reliance``, the same queries with their references shuffled (a fixed
permutation) and the drop in R@10 that causes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from ..config import Config
from ..data.captions import join_captions_val
from ..data.triplets import TripletSet
from ..errors import DataError
from ..features.cache import FeatureCache
from ..models.cir import CIRModel
from ..models.fusion import Fusion, block_slices, term_block
from ..retrieval.policy import ReferencePolicy, catalog_items, resolve_references
from .metrics import DEFAULT_KS, add_overall, recall_at_k, target_ranks

SHUFFLE_SEED = 0


@dataclass(frozen=True)
class Protocol:
    """``gallery_ids`` None: each set's own gallery."""

    name: str
    gallery_ids: tuple[str, ...] | None = None
    remove_reference: bool = False


SPLIT = Protocol("split")


def catalog_protocol(ids: Sequence[str]) -> Protocol:
    return Protocol("catalog", tuple(ids), remove_reference=True)


class EvalOptions(Config):
    """How sets are scored: query modes, K values, batching, where reference descriptions come
    from, whether to keep per-query ranks and to measure reliance on the reference."""

    modes: tuple[str, ...] = ("sum",)
    ks: tuple[int, ...] = DEFAULT_KS
    batch_size: int = 64
    num_workers: int = 0
    progress: bool = True
    describe: Literal["catalog", "predicted", "none"] = "catalog"
    keep_ranks: bool = False  # each query's 0-based target rank (for intervals and paired tests)
    reliance: bool = False  # also rank with shuffled references; report R@10 true - shuffled


def shuffled_order(n: int, seed: int = SHUFFLE_SEED) -> np.ndarray:
    """A fixed permutation of ``n`` queries in which none keeps its own place (one random cycle),
    so every query is shown another query's reference."""
    cycle = np.random.default_rng(seed).permutation(n)
    order = np.empty(n, dtype=np.int64)
    order[cycle] = np.roll(cycle, -1)
    return order


class PreparedSet:
    """One set's queries composed and its galleries encoded once; :meth:`ranks` scores them under a
    protocol in a query mode with a fusion (the model's by default)."""

    def __init__(
        self,
        model: CIRModel,
        triplet_set: TripletSet,
        cache: FeatureCache,
        options: EvalOptions,
        records: Mapping[str, Mapping[str, Any]] | None = None,
        protocols: Sequence[Protocol] = (SPLIT,),
        all_terms: bool = False,
        image_paths: Mapping[str, Any] | None = None,
    ):
        paths = {**triplet_set.image_paths, **(image_paths or {})}
        wanted = list(
            dict.fromkeys(
                [
                    *triplet_set.gallery_ids,
                    *(i for p in protocols for i in p.gallery_ids or ()),
                    *(t.candidate for t in triplet_set.triplets),
                ]
            )
        )
        ids, features = cache.encode(
            model.backbone,
            {i: paths[i] for i in wanted if i in paths},
            options.batch_size,
            options.num_workers,
            on_error="skip",
            progress=options.progress,
        )
        failed = cache.last_stats.failed
        self.ids = ids
        self.position = {image_id: row for row, image_id in enumerate(ids)}
        gallery_of = {
            p.name: [i for i in (p.gallery_ids or triplet_set.gallery_ids) if i in self.position] for p in protocols
        }
        own_gallery = set(triplet_set.gallery_ids)
        # a reference that failed to decode drops its query (counted); so does a target of the set's own
        # gallery that failed; a target outside the gallery stays, as a query that cannot succeed
        self.triplets = [
            t
            for t in triplet_set.triplets
            if t.candidate in self.position and (t.target in self.position or t.target not in own_gallery)
        ]
        self.model, self.options, self.protocols = model, options, {p.name: p for p in protocols}
        self.columns = {
            name: np.array([self.position[i] for i in gallery], dtype=np.int64) for name, gallery in gallery_of.items()
        }
        self.items = catalog_items(model, torch.from_numpy(features), ids, records, cache.root)
        self.described = self._described(records)
        self.queries = self._compose(features, records, None, all_terms)
        self.shuffle = shuffled_order(len(self.triplets)) if options.reliance else None
        self.shuffled = self._compose(features, records, self.shuffle, all_terms) if options.reliance else None
        self.counts = {
            "n_queries": len(self.triplets),
            "missing": len(triplet_set.missing_images) + failed,
            "skipped_triplets": triplet_set.skipped_triplets + len(triplet_set.triplets) - len(self.triplets),
        }

    def _described(self, records) -> dict[str, torch.Tensor]:
        """Catalog descriptions of the encoded images -> their item-side features (the description
        block of the items), so queries need not encode their references' descriptions again."""
        span = block_slices(self.model.block_dims()).get("description")
        if span is None:
            return {}
        block = self.items[:, span]
        texts = {row: (records or {}).get(i, {}).get("description") for i, row in self.position.items()}
        return {text: block[row] for row, text in texts.items() if isinstance(text, str) and text}

    def _compose(self, features: np.ndarray, records, order: np.ndarray | None, all_terms: bool):
        shown = [t.candidate for t in self.triplets]
        if order is not None:
            shown = [shown[i] for i in order]
        rows = [self.position[i] for i in shown]
        image = torch.from_numpy(features[rows]) if rows else torch.zeros(0, features.shape[1])
        prompts = [t.reference_prompt for t in self.triplets] if order is None else None
        resolved = resolve_references(
            self.model, ReferencePolicy(self.options.describe), shown, image, records, prompts
        )
        descriptions, attributes = [r.description for r in resolved], [r.attributes for r in resolved]
        return self.model.encode_queries(
            image,
            [join_captions_val(list(t.captions)) for t in self.triplets],
            descriptions,
            attributes,
            all_terms=all_terms,
            described=self.described,
            captions_encoded=None if order is None else self.queries.caption,
        )

    def _exclude(self, protocol: Protocol, shuffled: bool) -> np.ndarray | None:
        if not protocol.remove_reference:
            return None
        shown = [t.candidate for t in self.triplets]
        if shuffled and self.shuffle is not None:
            shown = [shown[i] for i in self.shuffle]
        column = {row: c for c, row in enumerate(self.columns[protocol.name])}
        return np.array([column.get(self.position[i], -1) for i in shown], dtype=np.int64)

    def scores(
        self, protocol: str, mode: str | None = None, fusion: Fusion | None = None, shuffled: bool = False
    ) -> np.ndarray:
        """[queries, gallery] fused scores under ``protocol``."""
        queries = self.shuffled if shuffled else self.queries
        if queries is None:
            raise ValueError("scores with shuffled references need EvalOptions(reliance=True)")
        with torch.no_grad():
            vectors = self.model.query_vectors(queries, mode, fusion).cpu() if len(self.triplets) else torch.zeros(0, 1)
            items = self.items[torch.from_numpy(self.columns[protocol])]
            return (vectors.float() @ items.float().T).numpy() if len(self.triplets) else np.zeros((0, len(items)))

    def term_scores(self, protocol: str, mode: str | None = None) -> dict[str, torch.Tensor]:
        """[queries, gallery] scores of each unweighted query term (see :mod:`~fashion_cir.models.fusion`)."""
        items = self.items[torch.from_numpy(self.columns[protocol])]
        blocks = {name: items[:, span] for name, span in block_slices(self.model.block_dims()).items()}
        with torch.no_grad():
            terms = self.model.query_terms(self.queries.to(self.model.backbone.device), mode)
            return {term: vector.float().cpu() @ blocks[term_block(term)].T for term, vector in terms.items()}

    def reference_columns(self, protocol: str) -> np.ndarray | None:
        """Each query's reference column in ``protocol``'s gallery when the protocol removes it (-1: none)."""
        return self._exclude(self.protocols[protocol], shuffled=False)

    def target_columns(self, protocol: str) -> np.ndarray:
        column = {row: c for c, row in enumerate(self.columns[protocol])}
        rows = [self.position.get(t.target, -1) if t.target is not None else -1 for t in self.triplets]
        return np.array([column.get(row, -1) for row in rows], dtype=np.int64)

    def ranks(
        self, protocol: str, mode: str | None = None, fusion: Fusion | None = None, shuffled: bool = False
    ) -> np.ndarray:
        """0-based rank of each query's target (``NOT_RETRIEVED`` when it is outside the gallery)."""
        return target_ranks(
            self.scores(protocol, mode, fusion, shuffled),
            self.target_columns(protocol),
            self._exclude(self.protocols[protocol], shuffled),
        )

    def metrics(self, protocol: str, mode: str | None = None, fusion: Fusion | None = None) -> dict:
        ranks = self.ranks(protocol, mode, fusion)
        result = add_overall(
            {**recall_at_k(ranks, self.options.ks), **self.counts, "n_gallery": len(self.columns[protocol])}
        )
        if self.options.keep_ranks:
            result["ranks"] = [int(r) for r in ranks]
        if self.shuffled is not None:
            shuffled = self.ranks(protocol, mode, fusion, shuffled=True)
            result["R@10_shuffled"] = recall_at_k(shuffled, (10,))["R@10"]
            result["reliance"] = result["R@10"] - result["R@10_shuffled"] if "R@10" in result else None
            if self.options.keep_ranks:
                result["ranks_shuffled"] = [int(r) for r in shuffled]
        return result


def average_table(table: dict[str, dict], ks: Sequence[int]) -> dict:
    """The per-set metrics of one protocol and mode, with their ``average`` (sets without a
    query are reported, not averaged)."""
    scored = [m for m in table.values() if m["n_queries"]]
    average: dict[str, Any] = {f"R@{k}": float(np.mean([m[f"R@{k}"] for m in scored])) for k in ks}
    for key in ("n_queries", "n_gallery", "missing"):
        average[key] = sum(m[key] for m in table.values())
    if scored and all("reliance" in m for m in scored):
        average["reliance"] = float(np.mean([m["reliance"] for m in scored]))
    empty = [name for name, m in table.items() if not m["n_queries"]]
    if empty:
        average["sets_without_queries"] = empty
    return {**table, "average": add_overall(average)}


def evaluate_sets(
    model: CIRModel,
    sets: Mapping[str, TripletSet],
    cache: FeatureCache,
    options: EvalOptions,
    records: Mapping[str, Mapping[str, Any]] | None = None,
    protocols: Sequence[Protocol] = (SPLIT,),
) -> dict[str, dict[str, dict]]:
    """{protocol: {mode: {set: metrics, ..., "average": metrics}}}."""
    prepared = {name: PreparedSet(model, s, cache, options, records, protocols) for name, s in sets.items()}
    if not any(p.counts["n_queries"] for p in prepared.values()):
        raise DataError(f"no usable query in {', '.join(sets)}: every triplet lacks its reference or target image")
    return {
        p.name: {
            mode: average_table({name: ps.metrics(p.name, mode) for name, ps in prepared.items()}, options.ks)
            for mode in options.modes
        }
        for p in protocols
    }


def format_table(report: dict[str, dict[str, dict]], ks: Sequence[int] = DEFAULT_KS) -> str:
    """A plain-text table: one row per (protocol, mode, set)."""
    header = (
        f"{'protocol':<10}{'mode':<10}{'set':<16}"
        + "".join(f"{'R@' + str(k):>8}" for k in ks)
        + f"{'queries':>9}{'gallery':>9}{'missing':>9}"
    )
    lines = [header, "-" * len(header)]
    for protocol, by_mode in report.items():
        for mode, table in by_mode.items():
            for name, metrics in table.items():
                lines.append(
                    f"{protocol:<10}{mode:<10}{name:<16}"
                    + "".join(f"{metrics[f'R@{k}']:>8.2f}" for k in ks)
                    + f"{metrics['n_queries']:>9}{metrics['n_gallery']:>9}{metrics['missing']:>9}"
                )
    return "\n".join(lines)
