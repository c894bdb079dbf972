"""Data: sharding raw data sets into webdataset tars, and streaming them back.

- :func:`write_shards` / ``distgen data shard`` writes deterministic shards and a manifest.
- :func:`make_loader` streams them for training (resampled, infinite) or evaluation (one exact pass).
"""

from distgen.data.errors import DataError
from distgen.data.pipeline import (
    DecodeSpec, ErrorPolicy, Loader, ShardSet, ShardStream, Slice, make_loader, partition,
    resolve_shards, split_by_node, split_by_worker, stream_seed, to_float,
)
from distgen.data.shard import manifest_path, write_shards
from distgen.data.sources import open_source

__all__ = [
    "DataError", "DecodeSpec", "ErrorPolicy", "Loader", "ShardSet", "ShardStream", "Slice",
    "make_loader", "manifest_path", "open_source", "partition", "resolve_shards",
    "split_by_node", "split_by_worker", "stream_seed", "to_float", "write_shards",
]
