"""The config tree of a distgen run. One dataclass per YAML section."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from distgen.config.core import check


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    dir: Optional[str] = None  # run folder; default runs/<name>
    seed: int = 0  # global seed; rank r of w uses seed * w + r

    def validate(self, path: str) -> None:
        check(bool(self.name) and "/" not in self.name, f"{path}.name", "must be a non-empty name without '/'")
        check(self.seed >= 0, f"{path}.seed", f"must be >= 0, got {self.seed}")

    @property
    def folder(self) -> str:
        return self.dir or f"runs/{self.name}"


@dataclass(frozen=True)
class DataConfig:
    # Shards to train on: a manifest (.json), a brace pattern of tar paths,
    # pipe: URLs, or a list of any of these.
    train: tuple[str, ...] = ()
    # Shards for evaluation (one exact pass).
    eval: tuple[str, ...] = ()
    resolution: int = 32  # images are resized / centre-cropped to this square size
    channels: int = 1  # 1 (grey) or 3 (RGB); images with another count are bad input
    resize: Literal["center_crop", "stretch"] = "center_crop"
    flip: bool = False  # random horizontal flips in training
    labels: bool = False  # every sample must carry a class label (cls)
    workers: int = 2  # DataLoader worker processes per rank
    shuffle_buffer: int = 2000  # samples held for shuffling in training mode
    on_error: Literal["raise", "skip"] = "raise"  # bad samples: stop, or skip and count

    def validate(self, path: str) -> None:
        check(self.resolution >= 4, f"{path}.resolution", f"must be >= 4, got {self.resolution}")
        check(self.channels in (1, 3), f"{path}.channels", f"must be 1 or 3, got {self.channels}")
        check(self.workers >= 0, f"{path}.workers", f"must be >= 0, got {self.workers}")
        check(self.shuffle_buffer >= 1, f"{path}.shuffle_buffer", f"must be >= 1, got {self.shuffle_buffer}")


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 64  # per device, per step (before gradient accumulation)

    def validate(self, path: str) -> None:
        check(self.batch_size >= 1, f"{path}.batch_size", f"must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
