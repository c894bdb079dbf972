"""The table of families x capabilities that ``distgen families`` prints, generated from the code: what each family
class declares (:mod:`distgen.families.capabilities`), what its configuration switches off
(``Family.capabilities_off``) and the DeepSpeed ZeRO stages it runs under (``Family.engine_problem``).

One row per family at its default configuration, and one per named variant (:data:`VARIANTS`) where a setting
changes a capability or the ZeRO stages. Cells: ``yes``; ``-`` (not declared); ``yes*`` (declared, on for this
configuration, switched off by another); ``no*`` (declared, switched off by this configuration, saying why).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

from distgen.families.base import DataInfo, Family
from distgen.families.capabilities import CAPABILITIES, Translates, missing

ZERO_STAGES = (1, 2, 3)
# The data every row is built for: RGB (score models' diffusers export is for RGB VE models only) with classes
# (JEM and conditional models need labels).
DATA = DataInfo(resolution=32, channels=3, num_classes=10)
SAMPLE = "sample"  # samples from noise: every family but a translator
ZERO = "ZeRO"


@dataclass(frozen=True)
class Variant:
    """A row of the table: ``family`` with the model settings ``model`` (over the family config's defaults; the
    label shows them) and ``needs`` (what its config requires but changes nothing here; not shown)."""

    family: str
    model: dict = field(default_factory=dict)
    needs: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.family + "".join(f" {k}={_text(v)}" for k, v in self.model.items())

    def build(self, data: DataInfo = DATA) -> Family:
        """The family of this configuration (no networks are built)."""
        from distgen.config.core import build_dataclass
        from distgen.families import FAMILIES

        cls = FAMILIES[self.family]
        return cls(build_dataclass(cls.config_cls, {"family": self.family, **self.needs, **self.model}, "model"), data)


def _text(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


# Each family's default, then the settings that change a capability or the ZeRO stages (a setting that changes
# neither, e.g. a GAN's arch without path length, is no row of its own).
VARIANTS: tuple[Variant, ...] = (
    Variant("diffusion"),  # every formulation (ddpm, edm, flow) exports alike on the U-Net
    Variant("diffusion", {"backbone": "dit"}),
    Variant("diffusion", {"backbone": "edm2"}),
    # its validation asks for an autoencoder folder, which the table never opens
    Variant("latent_diffusion", needs={"autoencoder": "AE_DIR"}),
    # a class-conditional DiT in ddpm exports diffusers' DiTPipeline; any other DiT its transformer/ folder
    Variant("latent_diffusion", {"backbone": "dit"}, needs={"autoencoder": "AE_DIR"}),
    Variant("autoencoder"),
    Variant("autoencoder", {"disc_weight": 0.1}),
    Variant("gan"),
    Variant("gan", {"arch": "progan"}),
    Variant("gan", {"arch": "stylegan2", "pl_weight": 2.0}),
    Variant("gan", {"loss": "wgan"}),
    Variant("pixelcnn"),
    Variant("pixelrnn"),
    Variant("glow"),
    Variant("vae"),
    Variant("vae", {"arch": "hvae"}),
    Variant("pix2pix"),
    Variant("cyclegan"),
    Variant("score"),
    Variant("score", {"sde": "vp"}),
    Variant("score", {"sde": "ncsn"}),
    Variant("score", {"objective": "ssm"}),
    Variant("ebm"),
    Variant("ebm", {"jem": True}),
    Variant("ffjord"),
)

COLUMNS: tuple[str, ...] = (SAMPLE, *(c.column for c in CAPABILITIES), ZERO)


@dataclass
class Row:
    """One family configuration's capabilities: ``offered`` by column; ``why`` a declared one is off (its
    ``missing`` sentence); ``declared`` by the class; ``zero``: stage -> None (runs) or why not."""

    label: str
    family: str
    model: dict
    offered: dict[str, bool]
    declared: dict[str, bool]
    why: dict[str, str]
    zero: dict[int, Optional[str]]

    def zero_stages(self) -> list[int]:
        return [s for s, why in self.zero.items() if why is None]


def row(family: Family, label: Optional[str] = None, model: Optional[dict] = None) -> Row:
    """The capabilities of ``family`` (an instance: its configuration counts) as the table shows them."""
    offered, declared, why = {}, {}, {}
    translator = missing(family, Translates) is None
    offered[SAMPLE] = declared[SAMPLE] = not translator
    for cap in CAPABILITIES:
        declared[cap.column] = isinstance(family, cap)
        lacking = missing(family, cap)
        offered[cap.column] = lacking is None
        if declared[cap.column] and lacking:
            why[cap.column] = lacking
    zero = {s: family.engine_problem(s) for s in ZERO_STAGES}
    return Row(label or family.name, family.name, dict(model or {}), offered, declared, why, zero)


def rows(variants: tuple[Variant, ...] = VARIANTS) -> list[Row]:
    return [row(v.build(), v.label, v.model) for v in variants]


def _depends(rs: list[Row]) -> dict[tuple[str, str], bool]:
    """(family, column) -> whether the family's declared capability is on for some rows and off for others, or
    off for a row at all (then it depends on the configuration)."""
    out: dict[tuple[str, str], bool] = {}
    for r in rs:
        for c in COLUMNS[:-1]:
            if r.declared[c] and not r.offered[c]:
                out[(r.family, c)] = True
    return out


def _zero_text(r: Row) -> str:
    stages = r.zero_stages()
    return ",".join(map(str, stages)) if stages else "none"


def cells(r: Row, depends: dict[tuple[str, str], bool]) -> list[str]:
    out = [r.label]
    for c in COLUMNS[:-1]:
        if not r.declared[c]:
            out.append("-")
        elif depends.get((r.family, c)):
            out.append("yes*" if r.offered[c] else "no*")
        else:
            out.append("yes")
    return out + [_zero_text(r)]


LEGEND = ("yes: offered.  -: not declared.  yes* / no*: declared but depends on the configuration: on here /\n"
          "switched off here (Family.capabilities_off).  sample: samples from noise (not a translator).  ZeRO: the\n"
          "DeepSpeed ZeRO stages it trains under (Family.engine_problem); DDP runs every family.\n"
          "Each row is built for RGB 32x32 data with 10 classes; a row is a family's default config or the\n"
          "settings shown.")


def text_table(rs: Optional[list[Row]] = None) -> str:
    """The table as aligned plain text (``distgen families``), its legend and the reasons for each ``no*`` and
    each refused ZeRO stage."""
    rs = rows() if rs is None else rs
    depends = _depends(rs)
    body = [["family", *COLUMNS]] + [cells(r, depends) for r in rs]
    widths = [max(len(line[i]) for line in body) for i in range(len(body[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = []
    for r in rs:
        for c, why in r.why.items():
            notes.append(f"  {r.label}: no {c}: {why}")
        by_reason: dict[str, list[int]] = {}
        for s, why in r.zero.items():
            if why is not None:
                by_reason.setdefault(why, []).append(s)
        for why, stages in by_reason.items():
            notes.append(f"  {r.label}: not ZeRO-{','.join(map(str, stages))}: {why}")
    return "\n".join(lines + ["", LEGEND, "", "Why not:", *notes]) + "\n"


def json_table(rs: Optional[list[Row]] = None) -> str:
    """The same as JSON (``distgen families --json``): columns, and per row what is offered, declared, depends
    on the configuration, why not, and the ZeRO stages."""
    rs = rows() if rs is None else rs
    depends = _depends(rs)
    out = {"columns": list(COLUMNS), "data": {"resolution": DATA.resolution, "channels": DATA.channels,
                                              "num_classes": DATA.num_classes},
           "rows": [{"label": r.label, "family": r.family, "model": r.model,
                     "offers": {c: r.offered[c] for c in COLUMNS[:-1]},
                     "declared": {c: r.declared[c] for c in COLUMNS[:-1]},
                     "depends_on_config": sorted(c for c in COLUMNS[:-1] if depends.get((r.family, c))),
                     "why_not": r.why, "zero_stages": r.zero_stages(),
                     "zero_problems": {str(s): why for s, why in r.zero.items() if why is not None}}
                    for r in rs]}
    return json.dumps(out, indent=2) + "\n"
