"""Problems x samples in batches, with one atomically written part file per finished problem.

A part file appears only when all of a problem's samples are done (written to a temporary file,
fsynced and renamed), so an interrupted run -- even by SIGKILL -- leaves whole parts or none, and
a rerun skips the problems whose part exists. Leftover temporary files (dot-prefixed) are never
read. The merged output is built from the parts in problem order, so it does not depend on how
the problems were split between processes or shards (see `dail.distributed`).
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from dail.data import iter_jsonl, write_jsonl_atomic
from dail.distributed import Shard, is_main_process, wait_for

logger = logging.getLogger(__name__)

Row = tuple[Any, int]  # (item, sample index)


def part_path(parts: Path, index: int, key: str) -> Path:
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    return parts / f"{index:06d}-{digest}.jsonl"


def run_per_problem(
    items: Sequence[Any],
    samples: int,
    *,
    key: Callable[[Any], str],
    parts: Path,
    batch_size: int,
    generate: Callable[[list[Row]], list[dict[str, Any]]],
    desc: str,
    shard: Shard | None = None,
) -> list[dict[str, Any]] | None:
    """Run `generate` over this shard's (item, sample) rows not yet done; return all records.

    Args:
        items: The problems (anything `key` names uniquely).
        samples: Records per item.
        key: Stable identifier of an item (names its part file).
        parts: Directory of part files.
        batch_size: Rows per `generate` call.
        generate: Maps a batch of rows to one record per row (each with a "sample" field).
        desc: Progress-bar label.
        shard: The items this process computes (default: all). Under a launcher every rank then
            waits until the other ranks' parts exist.

    Returns:
        Every item's records in item order, or None when other array-job shards have not
        finished yet (this shard's parts are written).
    """
    shard = shard or Shard()
    paths = [part_path(parts, i, key(item)) for i, item in enumerate(items)]
    mine = [i for i in range(len(items)) if shard.owns(i)]
    todo = [i for i in mine if not paths[i].exists()]
    if len(todo) < len(mine):
        logger.info("%s (%s): resuming, %d of %d problems already done", desc, shard.describe(),
                    len(mine) - len(todo), len(mine))
    rows = [(i, s) for i in todo for s in range(samples)]
    pending: dict[int, list[dict[str, Any]]] = defaultdict(list)
    # One progress bar per launch, not one per process writing over each other.
    with tqdm(total=len(rows), desc=desc, unit="sample", disable=not is_main_process()) as bar:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            records = generate([(items[i], s) for i, s in chunk])
            for (i, _), record in zip(chunk, records, strict=True):
                pending[i].append(record)
                if len(pending[i]) == samples:
                    write_jsonl_atomic(paths[i], sorted(pending.pop(i), key=lambda r: r["sample"]))
            bar.update(len(chunk))
    if shard.launched:
        wait_for(paths, describe=f"{desc} part files")
    missing = sum(not p.exists() for p in paths)
    if missing:
        logger.info("%s: %s done; %d of %d problems belong to shards that have not finished. "
                    "The last shard to finish writes the merged output (or rerun any shard's "
                    "command once all have finished)", desc, shard.describe(), missing, len(items))
        return None
    return [record for path in paths for _, record in iter_jsonl(path)]
