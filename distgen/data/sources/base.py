"""What a source reader returns (:class:`Source`) and the shard layouts it may declare."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import numpy as np


@dataclass
class Source:
    name: str  # the SOURCE argument, for the manifest
    count: int
    class_names: tuple[str, ...]  # empty when unlabelled
    items: Callable[[], Iterator[tuple[np.ndarray, Optional[int]]]]
    image_size: Optional[tuple[int, int]] = None  # (H, W) when every image shares it (paired: each side's)
    channels: Optional[int] = None
    labelled: bool = field(default=True)
    layout: str = "images"  # "paired": items yield ((a, b), label); "domain": one domain of an unpaired task
    extra: dict = field(default_factory=dict)  # manifest keys of the layout: task, domain, source_class


LAYOUTS = ("images", "paired", "domain")
DOMAINS = ("A", "B")
