"""What one torchrun process of train.py ends with, for tests/test_train.py's two-process test.

    python -m torch.distributed.run --nproc_per_node=2 tests/ddp_worker.py OUT [train.py options]

Runs train.py's main() unchanged in each process and, when training ends, writes OUT.rank<N>.json:
the world size, the captions this rank trained on, and a sha1 and sum of its parameters. The counting
and the dump wrap train.py's functions from outside, so train.py carries no test hook.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import run_start  # noqa: E402
import scst  # noqa: E402
import train  # noqa: E402
from run import Run  # noqa: E402

OUT = sys.argv[1]
seen = {"captions": 0}
runs: list[Run] = []
_objective, _build, _train = scst.CrossEntropy.__call__, run_start.build_run, train.train


def counting_objective(self, model, batch):
    seen["captions"] += batch.lengths.numel()
    return _objective(self, model, batch)


def keeping_build(*args, **kwargs) -> Run:
    runs.append(_build(*args, **kwargs))
    return runs[-1]


def dumping_train(*args, **kwargs):
    result = _train(*args, **kwargs)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])  # set by torchrun
    flat = torch.cat([p.detach().cpu().float().flatten() for p in runs[-1].model.parameters()])
    Path(f"{OUT}.rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world_size": world, "sha1": hashlib.sha1(flat.numpy().tobytes()).hexdigest(),
        "sum": float(flat.double().sum()), "samples": seen["captions"]}))
    return result


scst.CrossEntropy.__call__, run_start.build_run, train.train = counting_objective, keeping_build, dumping_train

if __name__ == "__main__":
    train.main(sys.argv[2:])
