#!/usr/bin/env python
"""MosaicML Streaming's side of `gq bench remote`, run by the benchmark in Streaming's own Python environment.

mosaicml-streaming pins its own NumPy and pulls torchvision and transformers, so it cannot share gq's
environment: the benchmark runs this script with the interpreter given by `--streaming-python`. It imports
NumPy, torch and Streaming only (no gq module), and prints one JSON object on its last line of output.

- `write RECORDS OUT_LOCAL OUT_REMOTE`: write an MDS copy of a split's scenes with Streaming's `MDSWriter`,
  uploading each shard to OUT_REMOTE (Streaming's own uploader). RECORDS is a JSON file the benchmark writes
  from gq's index: for each shard of the split, its SDF and labels files and the (slot, scene, grasps) of its
  scenes; the records are read from those files with NumPy, so both copies hold the same bytes of the same
  scenes. Columns: `scene` int64, `sdf` ndarray of the stored dtype and shape, `labels` ndarray float32
  (grasps, 20): 19 grasp values, then the score. Shards carry an xxh3_64 hash, which the reader checks.
- `read`: iterate a `StreamingDataset(remote=..., local=..., cache_limit=...)` through a standard torch
  `DataLoader` for whole epochs; per epoch its seconds, the scenes and grasps it delivered, and the bytes the
  S3 server served (its `GET /_gq/stats` counter, read before and after each epoch).

The S3 endpoint comes from S3_ENDPOINT_URL, the variable Streaming's S3 client reads (the benchmark sets it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

HASH = "xxh3_64"  # Streaming checks each downloaded shard against it, as gq checks every record


def write(records_path: str, local: str, remote: str, size_limit: int) -> dict:
    """The split's scenes as MDS shards of at most `size_limit` bytes, uploaded to `remote`."""
    from streaming import MDSWriter

    spec = json.loads(Path(records_path).read_text())
    grid = spec["grid"]
    columns = {"scene": "int64", "sdf": f"ndarray:{spec['dtype']}:{grid},{grid},{grid}", "labels": "ndarray:float32"}
    scenes = 0
    with MDSWriter(
        out=(local, remote), columns=columns, keep_local=True, compression=None, hashes=[HASH], size_limit=size_limit
    ) as w:
        for shard in spec["shards"]:
            sdf = np.load(shard["sdf"], mmap_mode="r")
            labels = np.load(shard["labels"], mmap_mode="r")
            for slot, scene, grasps in zip(shard["slots"], shard["scenes"], shard["grasps"]):
                w.write({"scene": scene, "sdf": np.array(sdf[slot]), "labels": np.array(labels[slot, :grasps])})
                scenes += 1
    index = json.loads((Path(local) / "index.json").read_text())
    shard_bytes = [s["raw_data"]["bytes"] for s in index["shards"]]
    return {
        "scenes": scenes,
        "shards": len(shard_bytes),
        "bytes": sum(shard_bytes),
        "max_shard_bytes": max(shard_bytes),
    }


def collate(samples: list[dict]) -> dict:
    """gq's Batch layout on the CPU: sdf float32 [S,1,D,D,D], grasps [N,19], scores [N], scene_of_grasp [N]."""
    sdf = torch.from_numpy(np.stack([s["sdf"] for s in samples])).float().unsqueeze(1)
    labels = torch.from_numpy(np.concatenate([s["labels"] for s in samples]))
    counts = torch.tensor([len(s["labels"]) for s in samples])
    return {
        "sdf": sdf,
        "grasps": labels[:, :19],
        "scores": labels[:, 19],
        "scene_of_grasp": torch.repeat_interleave(torch.arange(len(samples)), counts),
        "scene_ids": torch.tensor([int(s["scene"]) for s in samples]),
    }


def served_bytes(stats_url: str) -> int:
    with urllib.request.urlopen(stats_url, timeout=30) as reply:
        return int(json.loads(reply.read())["bytes"])


def read(args: argparse.Namespace) -> dict:
    """Whole epochs through Streaming's dataset and a torch DataLoader; what each took and downloaded."""
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()  # a killed earlier run may have left Streaming's shared memory behind
    start = time.perf_counter()
    before = served_bytes(args.stats_url)
    dataset = StreamingDataset(
        remote=args.remote,
        local=args.local,
        shuffle=True,
        shuffle_seed=args.seed,
        shuffle_block_size=args.shuffle_block_size,
        batch_size=args.batch_size,
        cache_limit=args.cache_limit,
        validate_hash=HASH,
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, num_workers=args.workers, collate_fn=collate
    )
    epochs = []
    for _ in range(args.epochs):
        scenes = grasps = 0
        for batch in loader:
            scenes += len(batch["scene_ids"])
            grasps += len(batch["scores"])
        now, served = time.perf_counter(), served_bytes(args.stats_url)
        epochs.append({"seconds": now - start, "scenes": scenes, "grasps": grasps, "bytes": served - before})
        start, before = now, served
    return {"epochs": epochs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    w = commands.add_parser("write", help="Write and upload the MDS copy of a split.")
    w.add_argument("records")
    w.add_argument("local")
    w.add_argument("remote")
    w.add_argument("--size-limit", type=int, required=True, help="Bytes per MDS shard at most.")
    r = commands.add_parser("read", help="Iterate whole epochs through a StreamingDataset.")
    r.add_argument("--remote", required=True)
    r.add_argument("--local", required=True)
    r.add_argument("--cache-limit", type=int, required=True)
    r.add_argument("--batch-size", type=int, required=True, help="Scenes per batch.")
    r.add_argument("--shuffle-block-size", type=int, required=True, help="Samples per shuffle block.")
    r.add_argument("--epochs", type=int, required=True)
    r.add_argument("--workers", type=int, required=True, help="DataLoader workers.")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--stats-url", required=True, help="The S3 server's counter of bytes served.")
    args = parser.parse_args()
    if args.command == "write":
        result = write(args.records, args.local, args.remote, args.size_limit)
    else:
        result = read(args)
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
