"""Where a run's time goes: a py-spy "raw" profile (``py-spy record -f raw -r RATE -p PID``) summed
into the pipeline's cost centres. Each sample counts once, for the first rule (in the order below)
whose function appears in its stack.

    .venv/bin/py-spy record -p PID -r 10 -f raw -o demo.profile --nonblocking
    .venv/bin/python benchmarks/profile_summary.py demo.profile --rate 10
"""

from __future__ import annotations

import argparse
from collections import Counter

# (cost centre, functions that mark it); the first match wins
RULES = [
    ("image decode + preprocess", ("_ImageDataset.__getitem__", "open_image")),
    (
        "image forward (trunk)",
        ("encode_image_trunk", "cnn_trunk", "trunk_engine.<locals>.<lambda>", "onnx_engine.<locals>.run"),
    ),
    ("alignment of the towers (text features + epochs)", ("align_offline_backbone",)),
    ("training: backward", ("Tensor.backward", "backward")),
    ("training: optimizer step", ("Optimizer.step", "AdamW.step", "GradScaler.step")),
    ("training: forward", ("Trainer.train_step",)),
    ("training: validation", ("Trainer.validate",)),
    ("fusion fit (queries + term scores + optimiser)", ("Runner.fit_fusion",)),
    ("matcher weight calibration", ("Evaluator.calibrate", "Runner.calibrate")),
    ("attribute heads", ("fit_attribute_heads",)),
    ("evaluation: query encoding", ("encode_queries", "compose_queries")),
    ("evaluation: scoring and ranks", ("Evaluator.__call__", "evaluate_sets", "Runner.score")),
    ("pictures", ("Runner.pictures", "example_picture", "stage_curves", "triplet_picture")),
    ("index build", ("build_index",)),
    ("triplet generation", ("generate_triplets",)),
    ("start-up and imports", ("<module>",)),
]


def summarise(path: str, rate: float) -> list[tuple[str, float]]:
    seconds: Counter[str] = Counter()
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            stack, _, count = line.rstrip().rpartition(" ")
            functions = {frame.split(" (")[0] for frame in stack.split(";")}
            short = functions | {
                f.rsplit(".", 1)[-1] for f in functions
            }  # "CIRModel.encode_queries" -> "encode_queries"
            centre = next((name for name, marks in RULES if short & set(marks)), "other")
            seconds[centre] += int(count) / rate
    return seconds.most_common()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile")
    parser.add_argument("--rate", type=float, default=10.0, help="samples per second the profile was taken at")
    args = parser.parse_args()
    rows = summarise(args.profile, args.rate)
    total = sum(s for _, s in rows)
    print("| cost centre | seconds | share |\n|---|---|---|")
    for name, value in rows:
        print(f"| {name} | {value:.0f} | {100 * value / total:.0f}% |")
    print(f"| total sampled | {total:.0f} | |")


if __name__ == "__main__":
    main()
