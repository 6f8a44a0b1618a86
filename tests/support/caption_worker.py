"""Subprocess for the resume test: captions the images listed in argv[2] (JSON id -> path) with the
precomputed backend (argv[1]) into cache dir argv[3], sleeping argv[4] seconds per batch."""

import json
import sys
import time
from pathlib import Path

from fashion_cir.captioning import run_captioning
from fashion_cir.captioning.precomputed import PrecomputedCaptioner


class SlowPrecomputed(PrecomputedCaptioner):
    batch_size = 8

    def answer(self, requests):
        time.sleep(float(sys.argv[4]))
        return super().answer(requests)


paths = {k: Path(v) for k, v in json.loads(Path(sys.argv[2]).read_text()).items()}
run_captioning(paths, SlowPrecomputed(sys.argv[1]), sys.argv[3], progress=False)
