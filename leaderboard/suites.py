"""What each suite measures: its headline metric, its test twin, which direction is better, its throughput.

Directions, labels and percent scaling are the metric declarations' (``harness.metrics``); a suite here only
names its metrics."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from harness import metrics as declared
from harness.catalog import Registry


@dataclass(frozen=True)
class SuiteMeta:
    name: str
    quality: str            # primary validation metric
    test: str               # its test-split twin
    higher_better: bool
    throughput: str         # training items per second
    unit: str               # "tok" | "img"
    label: str              # human label of the quality metric
    extra: tuple[str, ...] = ()  # further per-router metrics worth a column
    percent: bool = False   # a fraction in [0, 1], shown as a percentage
    test_label: str = ""    # human label of the test metric

    @property
    def test_name(self) -> str:
        return self.test_label or self.test.replace("_", " ")

    @property
    def bounds(self) -> tuple[float, float] | None:
        return (0.0, 1.0) if self.percent else None

    def quality_header(self) -> str:
        return f"{self.label}{' %' if self.percent else ''} {self.arrow}"

    def test_header(self) -> str:
        return f"{self.test_name}{' %' if self.percent else ''} {self.arrow}"

    def extra_header(self) -> str:
        """Header of the first extra metric's column (vision: ``val top-5 % ↑``)."""
        return f"{self.extra[0].replace('_', ' ').replace('top5', 'top-5')}{' %' if self.percent else ''} {self.arrow}"

    @property
    def arrow(self) -> str:
        return "↑" if self.higher_better else "↓"

    def shown(self, v: float | None) -> float | None:
        """A stored value (or CI half-width) as the board shows it: x 100 for a percentage."""
        return None if v is None else v * (100.0 if self.percent else 1.0)


def from_declarations(suite: str, quality: str, test: str, unit: str, extra: tuple[str, ...] = ()) -> SuiteMeta:
    """A suite that names its metrics; direction, labels and percent come from their declarations."""
    q, t = declared.get(quality), declared.get(test)
    assert q is not None and t is not None and q.higher_better is not None, f"declare {quality} and {test}"
    return SuiteMeta(suite, quality, test, q.higher_better, f"train_{unit}_per_s", unit, q.label, extra=extra,
                     percent=q.percent, test_label=t.label)


# the one registry type (harness.catalog): SUITES["lm"], "lm" in SUITES, SUITES.values()
SUITES: Registry[SuiteMeta] = Registry("suite")
SUITES.add("lm", from_declarations("lm", "val_bpb", "test_bpb", "tok"))
SUITES.add("vision", from_declarations("vision", "val_top1", "test_top1", "img", extra=("val_top5",)))


def suite_meta(suite: str, metric_names: Iterable[str] = ()) -> SuiteMeta:
    """Known suites by name; an unknown one is described from the metric names it wrote."""
    if suite in SUITES:
        return SUITES[suite]
    names = sorted(set(metric_names))
    tput = next((n for n in names if n.startswith("train_") and n.endswith("_per_s")), "train_tok_per_s")
    unit = tput[len("train_"):-len("_per_s")] or "item"
    val = next((n for n in names if n.startswith("val_")), "val_loss")
    higher = declared.higher_is_better(val)
    if higher is None:  # not declared (a plugin suite's own metric): the one guess from its name (harness.metrics)
        higher = declared.guess_higher_better(val)
    return SuiteMeta(suite, val, "test_" + val[4:], higher, tput, unit, val.replace("_", " "))
