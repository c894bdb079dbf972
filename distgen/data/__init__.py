"""Data: sharding raw data sets into webdataset tars, and streaming them back.

- :func:`write_shards` / :func:`shard_source` / ``distgen data shard`` write deterministic shards and a manifest
  (layouts images, paired, domain: :mod:`distgen.data.sources`; writing: :mod:`distgen.data.shard`).
- :func:`make_loader` streams them for training (resampled, infinite) or evaluation (one exact pass);
  :func:`make_train_loader` is the training stream of a config, two streams (domains A and B) when it is unpaired.

The loader's stages, one module each: :mod:`~distgen.data.manifest` (inputs), :mod:`~distgen.data.split`
(ranks and workers), :mod:`~distgen.data.reading` (tars), :mod:`~distgen.data.decode`,
:mod:`~distgen.data.batch`, composed in :mod:`~distgen.data.loader` (and :mod:`~distgen.data.unpaired`);
:mod:`~distgen.data.policy` handles bad inputs, :mod:`~distgen.data.verify` is ``distgen data verify``.
"""

from distgen.data.batch import to_float
from distgen.data.decode import DecodeSpec
from distgen.data.errors import DataError
from distgen.data.loader import Loader, ShardStream, make_loader, stream_seed
from distgen.data.manifest import ShardSet, manifest_path, read_layout, resolve_shards
from distgen.data.policy import ErrorPolicy
from distgen.data.shard import shard_source, write_shards
from distgen.data.sources import open_source, shard_jobs
from distgen.data.split import Slice, partition, split_by_node, split_by_worker
from distgen.data.unpaired import UnpairedLoader, check_domains, make_train_loader

__all__ = [
    "DataError", "DecodeSpec", "ErrorPolicy", "Loader", "ShardSet", "ShardStream", "Slice", "UnpairedLoader",
    "check_domains", "make_loader", "make_train_loader", "manifest_path", "open_source", "partition",
    "read_layout", "resolve_shards", "shard_jobs", "shard_source", "split_by_node", "split_by_worker",
    "stream_seed", "to_float", "write_shards",
]
