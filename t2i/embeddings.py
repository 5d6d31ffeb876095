"""Prompt embeddings on disk: computed once, memory-mapped by every process.

The text embeddings of SD3 are (77 + 256) x 4096 values a prompt (2.7 MB in bf16), so a prompt table held in RAM grows
with the prompt file and with the number of ranks (10k prompts on 8 ranks: ~218 GB). Here each prompt list (a prompt
file, or the null condition) is encoded once into numpy .npy files under a cache directory, keyed by the model's text
encoders, the sequence length, the dtype and the prompts' content; every process maps the files read-only (the page
cache holds one copy per machine, and only the rows a batch touches are read) and gathers its batch's rows.

    key      sha256 over {model fingerprint, family, max_sequence_length, dtype, kind, sha256 of the prompts}
    layout   <cache_dir>/<key>/{embeds.npy, pooled.npy, meta.json}; written to <key>.tmp-<pid>, then renamed (atomic)
    builder  the process with LOCAL_RANK 0 (rank 0 on one machine; without torchrun the only process) builds a missing
             entry; the others wait for the renamed directory (a build that fails leaves <key>.failed with the reason)

Disk cost: the cache holds what RAM held: 2.7 MB a prompt for SD3 (2.7 TB for a million prompts), 0.3 MB for SDXL.
"""

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

CACHE_VERSION = 1
NAMES = ("embeds", "pooled")
# numpy has no bfloat16: its bits are stored as uint16 and viewed back
_STORAGE = {torch.bfloat16: np.uint16, torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}


def default_cache_dir():
    """$T2I_CACHE_DIR, else $XDG_CACHE_HOME/t2i-prompt-embeddings, else ~/.cache/t2i-prompt-embeddings."""
    if os.environ.get("T2I_CACHE_DIR"):
        return Path(os.environ["T2I_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "t2i-prompt-embeddings"


def is_builder():
    """Whether this process builds missing cache entries: LOCAL_RANK 0 (one builder per machine under torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


def model_fingerprint(source):
    """What identifies the text encoders: a hub id as is; for a local folder its resolved path and, for every file of
    its text_encoder* / tokenizer* subfolders and model_index.json, the name, size and modification time (replaced
    weights get a new key)."""
    path = Path(source)
    if not path.is_dir():
        return {"hub": str(source)}
    files = []
    for sub in sorted(path.iterdir()):
        if sub.name == "model_index.json" or (sub.is_dir() and sub.name.startswith(("text_encoder", "tokenizer"))):
            for f in sorted([sub] if sub.is_file() else sub.rglob("*")):
                if f.is_file():
                    st = f.stat()
                    files.append([str(f.relative_to(path)), st.st_size, st.st_mtime_ns])
    return {"path": str(path.resolve()), "files": files}


def prompts_sha(prompts):
    return hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()


def entry_key(model, kind, prompts, dtype, max_sequence_length, family):
    """The cache key of one prompt list (kind: "prompts" or "null", which the pipelines encode differently)."""
    spec = {"version": CACHE_VERSION, "model": model, "family": family, "max_sequence_length": max_sequence_length,
            "dtype": str(dtype), "kind": kind, "n": len(prompts), "prompts": prompts_sha(prompts)}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32], spec


def open_entry(directory):
    """The memory-mapped tensors {embeds: (P, L, D), pooled: (P, D')} of a complete entry (read-only pages: copy-on-write
    mapping, never written)."""
    meta = json.loads((directory / "meta.json").read_text())
    dtype = getattr(torch, meta["torch_dtype"])
    out = {}
    for name in NAMES:
        arr = np.load(directory / f"{name}.npy", mmap_mode="c")
        t = torch.from_numpy(arr)
        out[name] = t.view(dtype) if dtype == torch.bfloat16 else t
    return out


def build_entry(directory, spec, prompts, encode, batch_size=16, description=""):
    """Encode prompts batch by batch (encode(list of str) -> {embeds: (b, L, D), pooled: (b, D')}) straight into .npy
    files under a temporary name, then rename it to directory (readers never see a partial entry)."""
    tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    directory.with_name(f"{directory.name}.failed").unlink(missing_ok=True)
    tmp.mkdir(parents=True)
    arrays, start = None, time.perf_counter()
    try:
        for i in range(0, len(prompts), batch_size):
            batch = {k: v.detach().cpu() for k, v in encode(prompts[i : i + batch_size]).items()}
            if arrays is None:
                dtype = batch["embeds"].dtype
                row_bytes = sum(v[0].numel() * v.element_size() for v in batch.values())
                need, free = row_bytes * len(prompts), shutil.disk_usage(tmp).free
                if need > free:
                    raise OSError(f"the prompt-embedding cache for {description or 'the prompts'} needs "
                                  f"{need / 1e9:.1f} GB ({len(prompts)} prompts x {row_bytes / 1e6:.2f} MB), "
                                  f"{free / 1e9:.1f} GB are free at {tmp.parent} (set another cache directory)")
                arrays = {k: np.lib.format.open_memmap(tmp / f"{k}.npy", mode="w+", dtype=_STORAGE[dtype],
                                                       shape=(len(prompts), *v.shape[1:])) for k, v in batch.items()}
            for k, v in batch.items():
                rows = v.view(torch.uint16) if v.dtype == torch.bfloat16 else v
                arrays[k][i : i + len(v)] = rows.numpy()
        for arr in arrays.values():
            arr.flush()
        meta = {**spec, "torch_dtype": str(dtype).removeprefix("torch."), "description": description,
                "shapes": {k: list(a.shape) for k, a in arrays.items()}, "seconds": time.perf_counter() - start}
        del arrays
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            tmp.rename(directory)
        except OSError:  # another machine's builder renamed the same entry first (shared file system): same content
            if not (directory / "meta.json").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        (directory.with_name(f"{directory.name}.failed")).write_text(f"{type(err).__name__}: {err}")
        raise


def wait_for_entry(directory, poll_seconds=1.0):
    """Block until the builder has renamed directory into place, or raise the reason of a build that failed after this
    wait began (an older <key>.failed is a previous run's)."""
    failed = directory.with_name(f"{directory.name}.failed")
    since = time.time() - 1.0
    while not (directory / "meta.json").exists():
        if failed.exists() and failed.stat().st_mtime >= since:
            raise RuntimeError(f"the prompt-embedding cache {directory} failed to build on the builder process: "
                               f"{failed.read_text()}")
        time.sleep(poll_seconds)


class PromptTable:
    """The world's prompt table (training prompts, evaluation prompts, the null condition) as consecutive parts, each
    a memory-mapped cache entry; rows(idx) gathers a batch's rows (a copy of those rows only)."""

    def __init__(self, parts):
        self.parts = parts  # list of {embeds, pooled}
        self.offsets = np.cumsum([0] + [len(p["embeds"]) for p in parts]).tolist()

    def __len__(self):
        return self.offsets[-1]

    def rows(self, idx):
        """{embeds: (n, L, D), pooled: (n, D')} of the prompts idx (n,) (CPU LongTensor), in the cache's dtype."""
        idx = idx.cpu().long()
        out = {k: torch.empty((len(idx), *self.parts[0][k].shape[1:]), dtype=self.parts[0][k].dtype) for k in NAMES}
        for part, lo, hi in zip(self.parts, self.offsets[:-1], self.offsets[1:]):
            mask = (idx >= lo) & (idx < hi)
            if mask.any():
                local = idx[mask] - lo
                for k in NAMES:
                    out[k][mask] = part[k][local]
        return out
