"""Data: sharding raw data sets into webdataset tars, and streaming them back.

- :func:`write_shards` / :func:`shard_source` / ``distgen data shard`` write deterministic shards and a manifest
  (layouts images, paired, domain: :mod:`distgen.data.sources`).
- :func:`make_loader` streams them for training (resampled, infinite) or evaluation (one exact pass);
  :func:`make_train_loader` is the training stream of a config, two streams (domains A and B) when it is unpaired.
"""

from distgen.data.errors import DataError
from distgen.data.pipeline import (
    DecodeSpec, ErrorPolicy, Loader, ShardSet, ShardStream, Slice, UnpairedLoader, check_domains, make_loader,
    make_train_loader, partition, read_layout, resolve_shards, split_by_node, split_by_worker, stream_seed, to_float,
)
from distgen.data.shard import manifest_path, shard_source, write_shards
from distgen.data.sources import open_source, shard_jobs

__all__ = [
    "DataError", "DecodeSpec", "ErrorPolicy", "Loader", "ShardSet", "ShardStream", "Slice", "UnpairedLoader",
    "check_domains", "make_loader", "make_train_loader", "manifest_path", "open_source", "partition",
    "read_layout", "resolve_shards", "shard_jobs", "shard_source", "split_by_node", "split_by_worker",
    "stream_seed", "to_float", "write_shards",
]
