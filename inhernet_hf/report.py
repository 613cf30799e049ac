"""Per-layer record of an inheritance and the table `model.inher_report` prints."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional


def dense_param_count(in_features: int, out_features: int, bias: bool) -> int:
    """Parameters of the dense layer (out x in weight, plus the bias)."""
    return in_features * out_features + (out_features if bias else 0)


@dataclass
class LayerRecord:
    """What happened to one targeted layer. `rank` is None when the layer stayed dense."""

    name: str
    in_features: int
    out_features: int
    bias: bool
    rank: Optional[int]
    num_heads: int
    dense_params: int
    params: int
    energy_kept: Optional[float] = None
    note: str = ""
    fit_error: Optional[float] = None  # head_init="fitted": calibration output error / identical heads' (<= 1)

    @property
    def inherited(self) -> bool:
        return self.rank is not None


class InherReport:
    """Per-layer table of an inherited model; `str()` renders it, `rows` holds the `LayerRecord`s."""

    def __init__(self, rows: list[LayerRecord]) -> None:
        self.rows = rows

    @property
    def dense_params(self) -> int:
        """Parameters the targeted layers held before inheritance."""
        return sum(r.dense_params for r in self.rows)

    @property
    def params(self) -> int:
        """Parameters the targeted layers hold now (inherited layers plus those kept dense)."""
        return sum(r.params for r in self.rows)

    @property
    def ratio(self) -> float:
        return self.params / self.dense_params

    def to_dict(self) -> dict[str, Any]:
        return {"layers": [asdict(r) for r in self.rows], "dense_params": self.dense_params,
                "params": self.params, "ratio": self.ratio}

    def __str__(self) -> str:
        fitted = any(r.fit_error is not None for r in self.rows)
        header = ("layer", "shape (out x in)", "rank", "heads", "dense params", "params", "energy kept")
        header += ("fit error",) if fitted else ()
        lines = [header]
        for r in self.rows:
            energy = "-" if r.energy_kept is None else f"{r.energy_kept:.4f}"
            rank = str(r.rank) if r.inherited else f"dense ({r.note})"
            fit = ("-" if r.fit_error is None else f"{r.fit_error:.4f}",) if fitted else ()
            lines.append((r.name, f"{r.out_features} x {r.in_features}", rank,
                          str(r.num_heads if r.inherited else "-"), f"{r.dense_params:,}", f"{r.params:,}", energy,
                          *fit))
        n_inh = sum(r.inherited for r in self.rows)
        lines.append((f"total ({n_inh} inherited, {len(self.rows) - n_inh} kept dense)", "", "", "",
                      f"{self.dense_params:,}", f"{self.params:,}", f"ratio {self.ratio:.4f}", *("",) * fitted))
        widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
        fmt = lambda row: " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        rule = "-+-".join("-" * w for w in widths)
        return "\n".join([fmt(lines[0]), rule, *map(fmt, lines[1:-1]), rule, fmt(lines[-1])])
