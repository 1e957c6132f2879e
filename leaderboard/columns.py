"""The overview's metric columns as one list of specs: the suite's quality / test / extra metrics and its
throughput (``SuiteMeta``, from the declarations in ``harness.metrics``), the throughput ratios, then every
declared board metric (``harness.metrics.board_metrics``).

Everything that shows or judges an overview column iterates :func:`board_columns`: the per-router values and
means (``leaderboard.overview.overview``), the header, the cell format, the help text (the page's tooltips), the
best-cell marks (``higher_better``), the LaTeX export (``latex``) and the CSV (the displayed table)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from harness.metrics import Metric, board_metrics
from leaderboard.formatting import fmt_ci, fmt_num, fmt_si, fmt_metric
from leaderboard.runs import BASELINE, DENSE
from leaderboard.suites import SuiteMeta

Cell = Callable[[float | None, float | None, int | None], str]  # (mean, CI half-width or None, n) -> text


@dataclass(frozen=True)
class Column:
    key: str                       # the overview column of the per-router value
    metric: str | None             # the per-run metric (or health) column it averages; None: nothing to average
    header: str                    # the page's (and the CSV's) column header
    higher_better: bool | None     # the best-cell mark's direction; None: not marked
    cell: Cell = field(compare=False)
    help: str = ""                 # the page's tooltip
    ci: str | None = None          # the overview column of its CI half-width: mean ± CI over seeds (Student t)
    ratio: tuple[str, str] | None = None  # (numerator column, reference router): the value is a ratio of means
    latex: tuple[str, str] | None = None  # (header, alignment) when the LaTeX export has the column
    shown: bool = True             # a column of the page (False: in the overview frame only)
    verdict: bool = False          # the column the comparison with the baseline is on (rank, n, ▲/▼ in LaTeX)
    mark_single: bool = False      # marked best even when only one router has a value
    source: str = "metric"         # "metric" (per run) | "health" (final routing health)

    @property
    def keys(self) -> list[str]:
        """Its columns of the overview frame."""
        return [self.key] + ([self.ci] if self.ci else [])


def _ci_cell(meta: SuiteMeta) -> Cell:
    return lambda mean, ci, n: fmt_ci(meta.shown(mean), meta.shown(ci), n)


def _metric_column(m: Metric) -> Column:
    return Column(m.key, m.name, m.board or m.label, m.higher_better, lambda v, ci, n: fmt_metric(m, v),
                  help=m.help, latex=(m.label, "r") if m.paper else None, source=m.source)


def board_columns(meta: SuiteMeta, baseline: str = BASELINE) -> list[Column]:
    """The overview's metric columns of ``meta``'s suite, in the page's order."""
    pct = r" (\%)" if meta.percent else ""
    arrow = r"$\uparrow$" if meta.higher_better else r"$\downarrow$"
    hb = meta.higher_better
    extra = meta.extra[0] if meta.extra else None
    cols = [
        Column("quality_mean", meta.quality, meta.quality_header(), hb, _ci_cell(meta), ci="quality_ci",
               help="mean ± 95% CI (Student t over seeds)", latex=(f"{meta.label}{pct} {arrow}", "l"),
               verdict=True, mark_single=True),
        Column("test_mean", meta.test, meta.test_header(), hb, _ci_cell(meta), ci="test_ci",
               help="test split, mean ± 95% CI", latex=(meta.test_name + pct, "l"), mark_single=True),
        Column("extra_mean", extra, meta.extra_header() if extra else "", hb, _ci_cell(meta), ci="extra_ci",
               help=f"{extra} on the whole validation split, mean ± 95% CI", shown=extra is not None,
               mark_single=True),  # the suite's first extra metric (vision: val_top5)
        Column("throughput", meta.throughput, f"{meta.unit}/s", True, lambda v, ci, n: fmt_si(v),
               ci="throughput_ci", help="training throughput, mean", latex=(f"{meta.unit}/s", "r")),
        Column("vs_dense", meta.throughput, "× dense", True, lambda v, ci, n: fmt_num(v, 2, "×"),
               ratio=("throughput", DENSE), help="throughput relative to the dense baseline"),
        Column("vs_smoe", meta.throughput, "× SMoE", True, lambda v, ci, n: fmt_num(v, 2, "×"),
               ratio=("throughput", baseline), latex=(r"$\times$ SMoE", "r"),
               help="throughput relative to SMoE (<1× = routing overhead over SMoE)"),
        *[_metric_column(m) for m in board_metrics()],  # the declared per-router columns (harness.metrics)
    ]
    if "fluctuation_last_change" not in {c.key for c in cols}:  # StableMoE's, in the frame, not on the page
        cols.append(Column("fluctuation_last_change", "fluctuation_last_change", "", None,
                           lambda v, ci, n: fmt_num(v, 3), shown=False, source="health"))
    return cols
