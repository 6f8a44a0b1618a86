"""The ``fashion-cir`` command line: a thin layer over the library. (No ``from __future__ import
annotations``: ``index add`` and ``upsert`` are one command whose option texts are evaluated when it
is registered.)"""

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from .errors import DEFAULT_MAX_FAILED_SHARE, FashionCIRError

PLAIN_HELP: dict[str, Any] = {
    "rich_markup_mode": None
}  # click's help: wraps at 80 columns and never cuts a spec example
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    **PLAIN_HELP,
    help="Composed image retrieval for fashion: triplets, training, evaluation, search.",
)
index_app = typer.Typer(
    no_args_is_help=True, **PLAIN_HELP, help="Build, grow, update and prune a searchable catalog index."
)
features_app = typer.Typer(
    no_args_is_help=True, **PLAIN_HELP, help="Fill a feature cache, split across processes (--shard I/N)."
)
app.add_typer(index_app, name="index")
app.add_typer(features_app, name="features")
attributes_app = typer.Typer(
    no_args_is_help=True, **PLAIN_HELP, help="Attribute heads: describe images that have no description."
)
app.add_typer(attributes_app, name="attributes")


def command(group: typer.Typer, name: str | None = None, **options: Any) -> Callable[[Callable], Callable]:
    """Register a command of ``group`` (``options`` go to ``Typer.command``) that reports
    FashionCIRError as one clear line (no traceback) and exits with status 2."""

    def register(func: Callable) -> Callable:
        @functools.wraps(func)
        def friendly(*args, **kwargs):
            try:
                return func(*args, **kwargs)
            except FashionCIRError as exc:
                typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
                raise typer.Exit(2) from None
            except KeyboardInterrupt:
                typer.secho("interrupted: finished work is saved; re-run the same command to resume", err=True)
                raise typer.Exit(130) from None

        return group.command(name, **options)(friendly)

    return register


def _options(context: typer.Context, *names: str) -> dict[str, Any]:
    """The command's options ``names`` by name, for a library call or config whose keywords are the
    options' names (each name is stated once)."""
    return {name: context.params[name] for name in names}


def _report_failures(failures: dict[str, str], where: str = "", limit: int = 50) -> None:
    """One line per failed item (id and reason) on stderr; past ``limit``, a count and where the rest are."""
    for item_id, reason in list(failures.items())[:limit]:
        typer.secho(f"failed: {item_id}: {reason}", fg=typer.colors.YELLOW, err=True)
    if len(failures) > limit:
        typer.secho(f"... and {len(failures) - limit} more failures{f' (all in {where})' if where else ''}", err=True)


def _dump(path: Path | None, obj) -> None:
    if path is not None:
        from .io import write_json

        write_json(path, obj)
        typer.echo(f"wrote {path}")


@command(app)
def evaluate(
    model: Path | None = typer.Option(None, help="A trained model folder (model.json + weights.pt)."),
    backbone: str | None = typer.Option(
        None, help="Zero-shot backbone spec: openclip:ViT-B-32:openai, tiny, offline:DIR."
    ),
    captions: Path | None = typer.Option(None, help="FashionIQ-format captions JSON of any catalog."),
    split_file: Path | None = typer.Option(None, help="Image split JSON (the gallery) for --captions."),
    gallery_split_file: list[Path] = typer.Option(
        [],
        help="Catalog protocol: the gallery is the union of these id lists (repeat the option, e.g. "
        "train, val and test for the whole catalog), the reference is left out of its own ranking.",
    ),
    images: Path | None = typer.Option(None, help="Images folder ({id}.jpg or .png)."),
    fashioniq: Path | None = typer.Option(
        None, help="FashionIQ root (captions/, image_splits/); evaluates dress, shirt, toptee."
    ),
    category: list[str] = typer.Option([], help="FashionIQ categories (default: all three)."),
    split: str = typer.Option("val", help="FashionIQ split."),
    mode: list[str] = typer.Option([], help="Query modes: image, text, sum, sum_raw, combiner (default: the model's)."),
    descriptions: Path | None = typer.Option(
        None,
        help="attributes.jsonl: reference prompts (--describe catalog) and gallery descriptions (default: "
        "the file the model was trained with, else attributes.jsonl beside the images folder).",
    ),
    describe: str | None = typer.Option(
        None,
        help="Reference descriptions in the prompt: catalog (--descriptions FILE), predicted (the model's attribute heads) or none; default: what the model folder records (a backbone: catalog with --descriptions, else none).",
    ),
    remove_reference: bool = typer.Option(False, help="CIRR protocol: drop the reference from its own ranking."),
    reliance: bool = typer.Option(
        False, help="Also rank with shuffled references and report the drop in R@10 (how much the reference counts)."
    ),
    strict: bool = typer.Option(False, help="Fail when images are missing instead of skipping and counting them."),
    preprocess: str = typer.Option("clip", help="clip or targetpad (zero-shot backbones only)."),
    cache_dir: Path = typer.Option(Path("runs/cache/features"), help="Static feature cache."),
    batch_size: int = typer.Option(64, help="Images per encoding batch."),
    workers: int = typer.Option(0, help="Image decoding worker processes."),
    json_out: Path | None = typer.Option(None, "--json", help="Write metrics JSON here."),
):
    """Recall@1/5/10/50 on FashionIQ (per category, average, overall) or any FashionIQ-format set."""
    from .data.catalog import read_attributes
    from .data.triplets import FASHIONIQ_CATEGORIES, load_fashioniq, load_triplet_set, read_split
    from .evaluation.evaluate import SPLIT, EvalOptions, Protocol, evaluate_sets, format_table
    from .features.cache import FeatureCache
    from .models.cir import load_model
    from .retrieval.policy import SOURCES

    if model is not None and backbone is not None:
        raise FashionCIRError("give --model DIR or --backbone SPEC, not both")
    protocol = Protocol("cirr", remove_reference=True) if remove_reference else SPLIT
    if fashioniq is not None:
        sets = load_fashioniq(fashioniq, split, tuple(category) or FASHIONIQ_CATEGORIES, images, strict)
    elif captions and (split_file or gallery_split_file) and images:
        gallery_files: list[str | Path] = [*gallery_split_file] or ([split_file] if split_file else [])
        sets = {captions.stem: load_triplet_set(captions, gallery_files, images, strict=strict)}
        if gallery_split_file:
            protocol = Protocol(
                "catalog", tuple(dict.fromkeys(i for f in gallery_split_file for i in read_split(f))), True
            )
    else:
        raise FashionCIRError(
            "give --fashioniq ROOT, or --captions FILE --split-file FILE (or --gallery-split-file) --images DIR"
        )
    for name, triplet_set in sets.items():
        report = triplet_set.report()
        typer.echo(
            f"{name}: {report['triplets']} queries, {report['gallery_images']} gallery images, "
            f"{report['missing_images']} images missing, {report['skipped_triplets']} triplets skipped",
            err=True,
        )
    if describe is not None and describe not in SOURCES:
        raise FashionCIRError(f"--describe must be one of {', '.join(SOURCES)}, got {describe!r}")
    cir = load_model(model, backbone, preprocess=preprocess)  # after the data checks: loading may download weights
    if model is not None and descriptions is None:  # the file it was trained with, else the catalog's beside the images
        candidates = [cir.descriptions_source, images.parent / "attributes.jsonl" if images is not None else None]
        descriptions = next((Path(c) for c in candidates if c is not None and Path(c).is_file()), None)
    records = read_attributes(descriptions) if descriptions else None
    typer.echo(f"descriptions (reference prompts, gallery items): {descriptions or 'none'}", err=True)
    if describe is None:  # a model folder: the source it was trained with; a bare backbone: what is given
        describe = cir.prompt_source if model is not None else ("catalog" if records else "none")
    if describe == "catalog" and records is None:
        raise FashionCIRError(
            "the prompts take catalog descriptions (--describe catalog, the model's default): pass "
            "--descriptions attributes.jsonl, or choose --describe predicted or --describe none"
        )
    if describe == "predicted" and cir.attribute_heads is None:
        raise FashionCIRError(
            "--describe predicted needs a model folder with attribute heads: "
            "run `fashion-cir attributes train --model DIR` first"
        )
    if (cir.matcher is not None or cir.attribute_space is not None) and not records:
        raise FashionCIRError(
            "this model reads gallery descriptions and attributes: pass --descriptions attributes.jsonl"
        )
    options = EvalOptions(
        modes=tuple(mode) or (cir.query_mode,),
        batch_size=batch_size,
        num_workers=workers,
        describe=describe,
        reliance=reliance,
        keep_ranks=False,
    )
    results = evaluate_sets(cir, sets, FeatureCache(cache_dir), options, records, [protocol])
    typer.echo(format_table(results))
    first = results[protocol.name][options.modes[0]]
    _dump(
        json_out,
        {
            **first,
            "query_mode": options.modes[0],
            "by_mode": results[protocol.name] if len(options.modes) > 1 else None,
            "protocol": protocol.name,
            "gallery_files": [str(f) for f in gallery_split_file] or None,
            "describe": describe,
            "descriptions": str(descriptions) if descriptions else None,
            "matcher": cir.matcher.config() if cir.matcher is not None else None,
            "fusion": cir.fusion.model_dump(mode="json"),
            "model": str(model) if model else backbone,
        },
    )


@command(app)
def align(
    catalog: Path = typer.Option(Path("../shared/datasets/clothing-dataset"), help="Clothing catalog folder."),
    out: Path = typer.Option(Path("runs/offline-backbone"), help="Where the aligned projections go."),
    cache_dir: Path = typer.Option(Path("runs/cache/features"), help="Static feature cache."),
    epochs: int = typer.Option(15, help="Alignment epochs (val picks the best)."),
    seed: int = typer.Option(0, help="Random seed."),
    towers: str = typer.Option("offline", help="offline[+OPTION...]: lite1/lite2, mpnet, hsv, blocksN."),
):
    """Align the offline backbone's projections (EfficientNet-Lite + MiniLM by default) on the catalog's train split."""
    from .data.catalog import load_clothing_catalog
    from .features.cache import FeatureCache
    from .training.align import AlignConfig, align_offline_backbone

    backbone, summary = align_offline_backbone(
        load_clothing_catalog(catalog),
        out,
        FeatureCache(cache_dir),
        AlignConfig(epochs=epochs, seed=seed),
        towers_spec=towers,
    )
    typer.echo(json.dumps({k: v for k, v in summary.items() if k != "versions"}, indent=2))
    typer.echo(f"use it as --backbone {backbone.spec}")


@command(app)
def caption(
    images: Path = typer.Option(..., help="Folder of catalog images."),
    out: Path = typer.Option(..., help="attributes.jsonl to write."),
    backend: str = typer.Option("llava-hf", help="llava-hf, openai or precomputed."),
    model_name: str | None = typer.Option(
        None, "--model", help="HF id / local folder (llava-hf), served model (openai), JSONL (precomputed)."
    ),
    split_file: Path | None = typer.Option(None, help="Only caption the ids in this split file."),
    cache_dir: Path = typer.Option(Path("runs/cache/captions"), help="Resumable answer cache."),
    vocab: Path | None = typer.Option(None, help="Vocabulary JSON overriding the default fashion attributes."),
    batch_size: int = typer.Option(8, help="llava-hf batch size."),
    device: str | None = typer.Option(None, help="llava-hf device (cuda, cpu); default: cuda when available."),
    base_url: list[str] = typer.Option(
        [],
        help="openai: e.g. http://127.0.0.1:8000/v1; repeat it to spread "
        "requests over several servers (per-server backoff).",
    ),
    shard: str | None = typer.Option(
        None,
        help="I/N: caption every N-th sorted id from the I-th into this shard's "
        "cache file (default: torchrun's RANK/WORLD_SIZE); then run "
        "without --shard to merge them into --out.",
    ),
    api_key_env: str = typer.Option("OPENAI_API_KEY", help="openai: name of the env var holding the key."),
    concurrency: int = typer.Option(4, help="openai: parallel requests."),
    timeout: float = typer.Option(60.0, help="openai: seconds per request."),
    max_attempts: int = typer.Option(3, help="Attempts per image before recording a failure."),
    max_failed_share: float = typer.Option(
        DEFAULT_MAX_FAILED_SHARE, help="Exit with an error when more than this share of the images fail."
    ),
):
    """Describe catalog images with a multimodal LLM: attributes + a short description per image.
    Every failed image is listed with its reason; the run exits 2 when all of them, or more than
    --max-failed-share, failed."""
    from .captioning import build_captioner, load_vocabulary, run_captioning, write_attributes
    from .captioning.runner import summary_path
    from .data.images import scan_images
    from .data.triplets import read_split
    from .errors import check_failures
    from .io import read_json
    from .sharding import parse_shard, select_shard

    if not images.is_dir():
        raise FashionCIRError(f"images folder not found: {images}")
    available = scan_images(images)
    ids = read_split(split_file) if split_file else sorted(available)
    paths = {i: available[i] for i in ids if i in available}
    index, count = parse_shard(shard)
    if count > 1:
        paths = {i: paths[i] for i in select_shard(paths, index, count)}
        out = out.with_name(f"{out.stem}.shard-{index}-of-{count}{out.suffix}")
    urls = base_url[0] if len(base_url) == 1 else base_url or None
    backend_options: dict[str, dict[str, Any]] = {
        "llava-hf": {"batch_size": batch_size, "device": device},
        "openai": {"base_url": urls, "api_key_env": api_key_env, "concurrency": concurrency, "timeout_s": timeout},
    }
    options = backend_options.get(backend, {})
    captioner = build_captioner(
        backend, model_name, load_vocabulary(vocab), **{k: v for k, v in options.items() if v is not None}
    )
    attributes = run_captioning(paths, captioner, cache_dir, max_attempts=max_attempts, shard=(index, count))
    write_attributes(out, attributes)
    summary = summary_path(cache_dir, captioner, (index, count))
    failures = {i: f"image file not found in {images}" for i in ids if i not in available}
    failures.update(
        {
            i: record.get("error") or record.get("status", "failed")
            for i, record in read_json(summary, "captioning summary").get("failures", {}).items()
        }
    )
    _report_failures(failures, str(summary))
    typer.echo(
        f"captioned {len(attributes)} of {len(paths)} images ({len(ids) - len(paths)} files missing); wrote {out}"
    )
    check_failures(failures, len(ids), max_failed_share, "images")


@command(app)
def triplets(
    context: typer.Context,
    attributes: Path = typer.Option(..., help="attributes.jsonl from `fashion-cir caption` (or the precomputed one)."),
    images: Path = typer.Option(..., help="Images folder."),
    train_split: Path = typer.Option(..., help="Split file of the training images: pairs are mined only here."),
    out: Path = typer.Option(..., help="Triplets JSON to write (FashionIQ format + extra keys)."),
    model: Path | None = typer.Option(None, help="Model folder giving the static image features."),
    backbone: str | None = typer.Option(None, help="Backbone spec giving the static image features."),
    cache_dir: Path = typer.Option(Path("runs/cache/features"), help="Static feature cache."),
    seed: int = typer.Option(0, help="Random seed."),
    band: tuple[float, float] = typer.Option((0.005, 0.3), help="Similarity band (quantiles or ranks)."),
    band_unit: str = typer.Option("quantile", help="quantile or rank"),
    min_changes: int = typer.Option(1, help="Fewest attribute changes per triplet."),
    max_changes: int = typer.Option(3, help="Most attribute changes per triplet."),
    targets_per_reference: int = typer.Option(2, help="Targets mined per reference image."),
    max_triplets: int | None = typer.Option(None, help="Cap on the number of triplets (default: no cap)."),
    hard_negatives: int = typer.Option(10, help="Hard negatives per triplet."),
    change_only_share: float = typer.Option(
        0.0, help='Share of triplets captioned change-only ("same but darker", no garment type unless it changes).'
    ),
    vocab: Path | None = typer.Option(None, help="Vocabulary JSON overriding the default fashion attributes."),
):
    """Mine attribute-aware triplets with relative captions and hard negatives."""
    from .captioning import load_precomputed, load_vocabulary
    from .data.images import find_image
    from .data.triplets import read_split
    from .features.cache import FeatureCache
    from .models.cir import load_model
    from .triplets import TripletConfig, generate_triplets, write_triplets

    vocabulary = load_vocabulary(vocab)
    attrs = load_precomputed(attributes, vocabulary)
    train_ids = read_split(train_split)
    paths = {i: p for i in train_ids if i in attrs and (p := find_image(images, i)) is not None}
    # settings first: a typo must not cost a model load and an encoding pass
    settings = _options(
        context,
        "seed",
        "band",
        "band_unit",
        "min_changes",
        "max_changes",
        "targets_per_reference",
        "max_triplets",
        "hard_negatives",
        "change_only_share",
    )
    config = TripletConfig.from_dict({**settings, "vocabulary": vocabulary}, "bad triplet settings")
    cir = load_model(model, backbone or "openclip:ViT-B-32:openai")
    ids, features = FeatureCache(cache_dir).encode(cir.backbone, paths, on_error="skip")
    generated, stats = generate_triplets(attrs, features, ids, config, train_ids=train_ids)
    write_triplets(out, generated, stats, config)
    typer.echo(json.dumps({k: v for k, v in stats.items() if not isinstance(v, (dict, list))}, indent=2))


def _model(model: Path | None, backbone: str | None):
    from .models.cir import load_model

    return load_model(model, backbone or "openclip:ViT-B-32:openai")


@command(features_app, "encode")
def features_encode(
    images: Path = typer.Option(..., help="Folder of catalog images."),
    cache_dir: Path = typer.Option(..., help="The feature cache every shard writes into."),
    split: Path | None = typer.Option(None, help="Only the ids in this split file."),
    shard: str | None = typer.Option(
        None,
        help="I/N: encode every N-th sorted id from the I-th (default: torchrun's RANK/WORLD_SIZE, else everything).",
    ),
    model: Path | None = typer.Option(None, help="Model folder giving the image features."),
    backbone: str | None = typer.Option(None, help="Backbone spec giving the image features."),
    batch_size: int = typer.Option(64, help="Images per encoding batch."),
    workers: int = typer.Option(0, help="Image decoding worker processes."),
):
    """Encode this process's shard of a catalog into a shared, content-keyed feature cache."""
    from .data.images import scan_images
    from .data.triplets import read_split
    from .features.cache import FeatureCache
    from .sharding import parse_shard, select_shard

    index, count = parse_shard(shard)
    if not images.is_dir():
        raise FashionCIRError(f"images folder not found: {images}")
    available = scan_images(images)
    wanted = read_split(split) if split else list(available)
    mine = select_shard([i for i in wanted if i in available], index, count)
    cache = FeatureCache(cache_dir)
    ids, _ = cache.encode(
        _model(model, backbone).backbone,
        {i: available[i] for i in mine},
        batch_size=batch_size,
        num_workers=workers,
        on_error="skip",
        progress=False,
    )
    stats = cache.last_stats
    typer.echo(
        f"shard {index}/{count}: {len(mine)} images, {stats.computed} encoded, {stats.reused} reused, "
        f"{stats.failed} failed"
    )


@command(features_app, "merge")
def features_merge(
    cache_dir: Path = typer.Option(..., help="The feature cache the shards wrote."),
    model: Path | None = typer.Option(None, help="Model folder the cache was filled with."),
    backbone: str | None = typer.Option(None, help="Backbone spec the cache was filled with."),
):
    """Merge the cache parts the shards wrote into one (run after every shard has finished)."""
    from .features.cache import FeatureCache
    from .sharding import merge_feature_parts

    counts = merge_feature_parts(FeatureCache(cache_dir).folder(_model(model, backbone).backbone))
    typer.echo(f"merged {counts['parts']} parts: {counts['unique']} features ({counts['rows']} rows)")


@command(index_app, "build")
def index_build(
    context: typer.Context,
    out: Path = typer.Argument(..., help="Index folder to create."),
    images: Path = typer.Option(..., help="Folder of catalog images (ids are file stems)."),
    metadata: list[Path] = typer.Option([], help="CSV (image/id column), JSON or JSONL metadata; repeatable."),
    split: Path | None = typer.Option(None, help="Only index the ids in this split file."),
    model: Path | None = typer.Option(None, help="Trained model folder."),
    backbone: str | None = typer.Option(None, help="Zero-shot backbone spec (default openclip:ViT-B-32:openai)."),
    store: str = typer.Option(
        "faiss",
        help="faiss (in-process), milvus:PATH.db (embedded milvus-lite) or "
        "milvus:http://host:19530 (a Milvus server or cluster).",
    ),
    factory: str = typer.Option(
        "auto",
        help="FAISS factory string: auto (Flat below 200k items, else IVF), Flat (exact), IVF1024,Flat, HNSW32; "
        "compact codes: SQfp16 (float16), SQ8 (int8), IVF1024,SQ8, ...",
    ),
    candidates: int | None = typer.Option(
        None,
        min=1,
        help="Two-stage search by default: the store finds this many items, the exact score from the "
        "stored float32 rows orders them (for IVF / SQ8 / fp16 indexes).",
    ),
    mmap: bool = typer.Option(False, help="Readers (search, serve) memory-map the FAISS index and the stored rows."),
    milvus_index: str = typer.Option(
        "FLAT", help="Milvus index: FLAT, IVF_FLAT,nlist=1024, HNSW,M=16,efConstruction=200, ..."
    ),
    milvus_collection: str | None = typer.Option(None, help="Milvus collection (default fashion_cir_<folder name>)."),
    nprobe: int = typer.Option(64, help="IVF lists probed per query (64: recall@10 0.98 at 100k, BENCHMARKS Scale)."),
    ef_search: int = typer.Option(64, help="HNSW search depth."),
    cache_dir: Path | None = typer.Option(None, help="Feature cache (default INDEX/feature-cache)."),
    batch_size: int = typer.Option(64, help="Images per encoding batch."),
    workers: int = typer.Option(0, help="Image decoding worker processes."),
    overwrite: bool = typer.Option(False, help="Replace an existing index."),
    max_failed_share: float = typer.Option(
        DEFAULT_MAX_FAILED_SHARE, help="Fail (write nothing) when more than this share of the images cannot be read."
    ),
):
    """Encode a catalog into a searchable index (resumable; saved with the model fingerprint).
    Metadata fields become filterable (`search --filter`). Unreadable images are left out and
    listed with their reasons."""
    from .data.triplets import read_split
    from .retrieval.index import build_index

    index = build_index(
        out,
        _model(model, backbone),
        images,
        list(metadata) or None,
        ids=read_split(split) if split else None,
        num_workers=workers,
        milvus={"index": milvus_index, "collection": milvus_collection},
        **_options(
            context,
            "factory",
            "nprobe",
            "ef_search",
            "candidates",
            "mmap",
            "cache_dir",
            "batch_size",
            "overwrite",
            "store",
            "max_failed_share",
        ),
    )
    _report_failures(index.report["failures"])
    typer.echo(f"indexed {len(index)} images into {out} ({index.store_kind}): {json.dumps(index.report)}")


IndexFolder = Annotated[Path, typer.Argument(help="Existing index folder.")]
UpdateSplit = Annotated[Path | None, typer.Option(help="Only the ids in this split file.")]
IndexModel = Annotated[Path | None, typer.Option(help="Model folder the index was built with.")]
IndexBackbone = Annotated[
    str | None,
    typer.Option(help="Zero-shot backbone spec the index was built with (default: the index's)."),
]
UpdateCache = Annotated[Path | None, typer.Option(help="Feature cache (default INDEX/feature-cache).")]


def _index_update_command(name: str, replace: bool, summary: str, images: str, metadata: str, fail: str) -> None:
    """Register ``index add`` (``replace`` False: only new ids) or ``index upsert`` (insert or
    replace): one command with its own help texts, encoding the images with the index's model."""

    @command(index_app, name, help=summary)
    def update(
        index_dir: IndexFolder,
        images_dir: Annotated[Path, typer.Option("--images", help=images)],
        metadata_files: Annotated[list[Path] | None, typer.Option("--metadata", help=metadata)] = None,
        split: UpdateSplit = None,
        model: IndexModel = None,
        backbone: IndexBackbone = None,
        cache_dir: UpdateCache = None,
        max_failed_share: Annotated[float, typer.Option(help=fail)] = DEFAULT_MAX_FAILED_SHARE,
    ) -> None:
        from .data.triplets import read_split
        from .retrieval.index import add_to_index
        from .retrieval.manifest import read_manifest

        index = add_to_index(
            index_dir,
            _model(model, backbone or read_manifest(index_dir)["backbone"]),
            images_dir,
            metadata_files or None,
            replace=replace,
            ids=read_split(split) if split else None,
            cache_dir=cache_dir,
            max_failed_share=max_failed_share,
        )
        _report_failures(index.report["failures"])
        typer.echo(f"index now holds {len(index)} images: {json.dumps(index.report)}")


_index_update_command(
    "add",
    False,
    "Add new catalog images to an index (refuses a model that does not match it; concurrent adds take turns). "
    "Unreadable images are left out and listed with their reasons.",
    images="Folder of images; only ids not yet indexed are encoded.",
    metadata="Metadata files for the new images; repeatable.",
    fail="Fail (add nothing) when more than this share of the new images cannot be read.",
)
_index_update_command(
    "upsert",
    True,
    "Insert or replace catalog items (features, metadata, image path); a running service sees them. "
    "Unreadable images are left out and listed with their reasons.",
    images="Folder of images to insert or replace (changed files are re-encoded).",
    metadata="Metadata of those images (replaces the stored metadata); repeatable.",
    fail="Fail (change nothing) when more than this share of the images cannot be read.",
)


@command(index_app, "info")
def index_info_command(index_dir: Path = typer.Argument(..., help="Existing index folder.")):
    """What an index holds and needs: store, factory, items, row width, two-stage setting, bytes of
    the searched vectors and of the stored rows on disk, whether readers memory-map them (JSON)."""
    from .retrieval.folder import index_info

    typer.echo(json.dumps(index_info(index_dir), indent=2))


@command(index_app, "remove")
def index_remove(
    index_dir: Path = typer.Argument(..., help="Existing index folder."),
    ids: list[str] = typer.Argument(None, help="Item ids to delete."),
    ids_file: Path | None = typer.Option(None, help="A split file (JSON list) or a text file with one id per line."),
):
    """Delete catalog items by id; a running service sees the change without a restart."""
    from .data.triplets import read_split
    from .retrieval.index import remove_from_index

    wanted = list(ids or [])
    if ids_file is not None:
        if not ids_file.is_file():
            raise FashionCIRError(f"ids file not found: {ids_file}")
        wanted += (
            read_split(ids_file)
            if ids_file.suffix == ".json"
            else [line.strip() for line in ids_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        )
    index, removed, unknown = remove_from_index(index_dir, wanted)
    typer.echo(
        f"removed {len(removed)} items; index now holds {len(index)}"
        + (f"; {len(unknown)} ids were not in the index, first: {unknown[0]!r}" if unknown else "")
    )


@command(app)
def search(
    index_dir: Path = typer.Option(..., "--index", help="Index folder."),
    image: Path | None = typer.Option(None, help="Reference image file (its description is predicted)."),
    item_id: str | None = typer.Option(None, "--id", help="Reference catalog id (left out of the results)."),
    text: str = typer.Option("", help='How the target differs, e.g. "is red with long sleeves".'),
    k: int = typer.Option(10, "-k", min=1, max=1000, help="Number of results."),
    filter_text: str = typer.Option(
        "", "--filter", help='Metadata filter, e.g. category == "dress" and color not in ["black", "grey"].'
    ),
    category: list[str] = typer.Option([], help="Keep only this category (repeatable)."),
    color: list[str] = typer.Option([], help="Keep only this colour (repeatable)."),
    same_type: bool = typer.Option(False, help="Keep only the reference's category (predicted for an image)."),
    candidates: int | None = typer.Option(
        None,
        min=0,
        help="Two-stage search: re-score this many store candidates exactly (default: the index's; 0: off).",
    ),
    model: Path | None = typer.Option(None, help="Model folder (default: the index's)."),
    backbone: str | None = typer.Option(None, help="Zero-shot backbone spec instead of a model."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """Composed search: a reference (image or id) plus a relative caption -> ranked ids and scores."""
    from .data.images import open_image
    from .retrieval.folder import index_model, open_index
    from .retrieval.manifest import read_manifest
    from .retrieval.query import SearchRequest

    request = SearchRequest(
        text=text,
        k=k,
        item_id=item_id,
        image=image is not None,
        filter=filter_text,
        filters={"category": category, "color": color},
        same_type=same_type,
        candidates=candidates,
    )
    manifest = read_manifest(index_dir)
    parsed = request.parsed_filter(manifest.get("fields"))  # before loading a model
    cir = index_model(index_dir, model or backbone)  # default: the model the index was built with
    index = open_index(index_dir, cir, read_only=True)
    if parsed is not None and "fields" not in manifest:  # an index from before filters: fields from its metadata
        parsed = request.parsed_filter(index.fields)
    result = request.run(cir, index, open_image(image) if image else None, parsed)
    if json_out:
        typer.echo(json.dumps([{"id": h.id, "score": h.score, "metadata": h.metadata} for h in result.hits], indent=2))
        return
    typer.echo(
        f"query: {result.query_text or '(the reference image alone)'}  [prompt: {result.prompt_source}]", err=True
    )
    for rank, hit in enumerate(result.hits, 1):
        typer.echo(f"{rank:>3}  {hit.score:.4f}  {hit.id}  {hit.metadata.get('description', '')}")


@command(attributes_app, "train")
def attributes_train(
    model: Path = typer.Option(..., help="Model folder; the heads are saved into it."),
    catalog: Path = typer.Option(Path("../shared/datasets/clothing-dataset"), help="Clothing catalog folder."),
    attributes: Path | None = typer.Option(None, help="MLLM attributes JSONL (default: the catalog's)."),
    cache_dir: Path = typer.Option(Path("runs/cache/features"), help="Static feature cache."),
    report: Path | None = typer.Option(None, help="Write the val report (markdown table) here."),
    max_train_images: int | None = typer.Option(None, min=1, help="Train on the first N train images only."),
):
    """Train one classifier per attribute on the train split's image features, select on val."""
    from .data.catalog import load_clothing_catalog
    from .features.cache import FeatureCache
    from .models.cir import load_model
    from .training.attribute_heads import fit_attribute_heads, format_report

    cir = load_model(model)
    heads = fit_attribute_heads(
        cir,
        load_clothing_catalog(catalog, attributes),
        FeatureCache(cache_dir),
        progress=True,
        max_train_images=max_train_images,
    )
    heads.save(model)
    table = format_report(heads)
    typer.echo(table)
    if report is not None:
        from .io import atomic_write_text

        atomic_write_text(report, table + "\n")
    typer.echo(f"saved attribute heads into {model}")


@command(attributes_app, "predict")
def attributes_predict(
    model: Path = typer.Option(..., help="Model folder with attribute heads."),
    image: Path = typer.Option(..., help="Image file to describe."),
):
    """Predicted attributes (with confidences) and the description an upload of IMAGE gets."""
    from .data.images import open_image
    from .models.attributes import describe
    from .models.cir import load_model
    from .retrieval.query import encode_reference_image

    cir = load_model(model)
    predicted = cir.predict_attributes(encode_reference_image(cir, open_image(image)))[0]
    typer.echo(json.dumps({"description": describe(predicted), "attributes": predicted}, indent=2))


@command(app, "serve")
def serve_command(
    index_dir: Path = typer.Option(..., "--index", help="Index folder."),
    model: Path | None = typer.Option(None, help="Model folder (default: the model the index was built with)."),
    backbone: str | None = typer.Option(None, help="Zero-shot backbone spec instead of a model."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, help="Port to listen on."),
    max_upload_mb: int = typer.Option(10, help="Largest accepted upload, in MB."),
    upload_workers: int = typer.Option(2, help="Uploads decoded and encoded at once."),
    upload_queue: int = typer.Option(16, help="Uploads that may wait for a worker; beyond that: 503 + Retry-After."),
    search_timeout: float = typer.Option(15.0, help="Seconds the page waits for a search before offering a retry."),
    sample_seed: int | None = typer.Option(
        None,
        min=0,
        max=999_999_999,
        help="Seed of the page's catalog sample (default: a random sample "
        "on each visit; ?seed=N in the page's address wins).",
    ),
    int8_queries: bool = typer.Option(
        False,
        "--int8-queries",
        help="Read queries with an int8 copy of the description matcher (faster on a CPU; rankings "
        "change a little, see BENCHMARKS.md).",
    ),
    describe_uploads: str | None = typer.Option(
        None,
        help="Describe uploaded photos with this MLLM backend (openai or llava-hf), as the catalog was "
        "described; the attribute heads answer when it gives no record.",
    ),
    caption_model: str | None = typer.Option(None, help="--describe-uploads: the served model name or HF id."),
    caption_base_url: list[str] = typer.Option([], help="--describe-uploads openai: the server's API root."),
    caption_api_key_env: str = typer.Option("OPENAI_API_KEY", help="--describe-uploads openai: env var of the key."),
    caption_timeout: float = typer.Option(10.0, help="--describe-uploads openai: seconds per request."),
):
    """Serve the search API and web page."""
    from .models.cir import load_model
    from .serving.app import serve

    cir = load_model(model, backbone) if model or backbone else None  # None: the backbone the index records
    captioner = None
    if describe_uploads is not None:
        captioner = _upload_captioner(
            describe_uploads, caption_model, caption_base_url, caption_api_key_env, caption_timeout
        )
    elif caption_model or caption_base_url:
        raise FashionCIRError("--caption-model and --caption-base-url name the MLLM of --describe-uploads: give it too")
    typer.echo(f"serving http://{host}:{port}/")
    serve(
        index_dir,
        cir,
        host=host,
        port=port,
        max_upload_bytes=max_upload_mb * 1024 * 1024,
        upload_workers=upload_workers,
        upload_queue=upload_queue,
        search_timeout_s=search_timeout,
        sample_seed=sample_seed,
        int8_queries=int8_queries,
        upload_captioner=captioner,
    )


def _upload_captioner(backend: str, model: str | None, base_url: list[str], api_key_env: str, timeout: float):
    """The MLLM that describes uploads, from ``serve``'s options: one try per request with a short
    timeout (a shopper is waiting; the heads answer when it fails)."""
    from .captioning import build_captioner

    if backend == "llava-hf":
        if base_url:
            raise FashionCIRError("--caption-base-url is for --describe-uploads openai; llava-hf runs in this process")
        return build_captioner(backend, model)
    if backend != "openai":
        raise FashionCIRError(
            f"--describe-uploads {backend!r}: uploads are described by a served MLLM: openai or llava-hf"
        )
    if not model or not base_url:
        raise FashionCIRError(
            "--describe-uploads openai needs --caption-model (the name the server serves) and --caption-base-url "
            "(its API root, e.g. http://127.0.0.1:8001/v1)"
        )
    urls = base_url[0] if len(base_url) == 1 else base_url
    return build_captioner(
        backend, model, base_url=urls, api_key_env=api_key_env, timeout_s=timeout, max_retries=0, concurrency=1
    )


EXIT_STOPPED = 75  # a training run stopped on purpose (stop_after_steps); re-running resumes it
DEMO_RECIPE = Path(__file__).resolve().parents[2] / "configs" / "demo_clothing.json"


def _run(recipe: Path, profile: str | None, overrides: list[str], serve: bool, port: int) -> None:
    from .pipeline import load_recipe, run_recipe
    from .training.loop import TrainingStopped

    loaded = load_recipe(recipe, profile, overrides)
    try:
        run_recipe(loaded, f"{recipe}" + (f" --profile {profile}" if profile else ""), serve=serve, port=port)
    except TrainingStopped as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(EXIT_STOPPED) from None


@command(app, "run")
def run_command(
    recipe: Path = typer.Argument(
        ..., help="Recipe JSON (see configs/): catalog, towers, triplets, stages, evaluation."
    ),
    profile: str | None = typer.Option(None, help="A named override set of the recipe, e.g. fast."),
    override: list[str] = typer.Option(
        [], "--set", help="KEY=VALUE override (JSON value), e.g. out=runs/x or stages.0.config.epochs=2; repeatable."
    ),
    serve: bool = typer.Option(False, help="Serve the index at the end."),
    port: int = typer.Option(8000, help="Port of the web page."),
):
    """Run a recipe's steps in order; a re-run reuses every finished step. Several GPUs:
    torchrun --nproc_per_node N -m fashion_cir.cli run RECIPE."""
    _run(recipe, profile, override, serve, port)


@command(app)
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Where every output of the demo goes."),
    fast: bool = typer.Option(False, help="A small, quick run (tests, CI): the recipe's 'fast' profile."),
    serve: bool = typer.Option(True, help="Start the web page at the end (--no-serve for CI)."),
    port: int = typer.Option(8000, help="Port of the web page."),
):
    """The demo recipe (configs/demo_clothing.json) on the clothing catalog, then the web page."""
    _run(DEMO_RECIPE, "fast" if fast else None, [f"out={out}"], serve, port)


def main() -> None:  # pragma: no cover
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
