"""What the long-run tests compare between two runs: adapter weights bit for bit and metrics.jsonl records."""

import json
import math
from pathlib import Path

import torch


def weights(world):
    return {role: [p.detach().clone() for p in world.params(role)] for role in world.adapter_roles}


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(x, y) for r in a for x, y in zip(a[r], b[r], strict=True))


def records(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def strip_time(rs):
    """Records without wall time; NaN (a mode width of a mode no sample reached) as a string, so that == compares it."""
    return [{k: ("nan" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items() if k != "time"} for r in rs]
