"""An export folder's ``distgen.json``: what model the folder holds (family, config, data geometry) and where its
weights came from. ``distgen sample`` / ``eval`` read it to rebuild the family; ``export --force`` reads it to tell
distgen's own export from other files (:mod:`distgen.ownership`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distgen import readback as rb
from distgen.config import Config, build_config
from distgen.errors import SampleError
from distgen.families import DataInfo

EXPORT_META = "distgen.json"  # distgen.ownership.EXPORT_MARKER
EXPORT_FORMAT = "distgen-export/1"
# distgen.json of an export (exports before "format" existed lack it, and still load)
EXPORT_SCHEMA = rb.Obj({"format": rb.Str(choices=(EXPORT_FORMAT,)), "family": rb.Str(max_len=64),
                        "data_info": rb.DATA_INFO, "config": rb.CONFIG, "source": rb.Anything()},
                       optional=("format", "family", "source"))


def load_config(d: Any, where: Path) -> Config:
    """The config stored in an export's or a checkpoint's JSON, or a SampleError naming ``where``."""
    if not isinstance(d, dict):
        raise SampleError(f"{where}: 'config' must be a mapping of config sections, got {type(d).__name__}")
    try:
        return build_config(d)
    except Exception as e:
        raise SampleError(f"{where}: the stored config does not load ({e})") from None


def read_export_meta(folder: Path) -> tuple[Config, DataInfo]:
    """An export's ``distgen.json``: its config and data geometry, or a SampleError naming the file and key."""
    path = folder / EXPORT_META
    meta = rb.read_json(path, EXPORT_SCHEMA, error=SampleError, max_bytes=4 * rb.MiB, what="distgen.json")
    cfg = load_config(meta["config"], path)
    return cfg, data_info(meta["data_info"], cfg, path)


def data_info(d: dict, cfg: Config, where: Path) -> DataInfo:
    """A checked ``data_info`` (readback.DATA_INFO) that must describe the data its config does."""
    info = DataInfo(**d)
    if (info.resolution, info.channels) != (cfg.data.resolution, cfg.data.channels):
        raise SampleError(f"{where}: data_info: {info.resolution}x{info.resolution}x{info.channels} images, but its "
                          f"config's data section says {cfg.data.resolution}x{cfg.data.resolution}x"
                          f"{cfg.data.channels}")
    return info
