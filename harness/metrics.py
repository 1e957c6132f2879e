"""Every metric the harness records or shows, declared once: name, split, direction, format, label, help.

    declare(Metric("val_bpb", split="val", higher_better=False, fmt=".4f", label="val bpb",
                   help="bits per byte of the validation split (BPC on enwik8/text8)"))

What reads the declarations (rather than keeping its own copy):

* the leaderboard's suite descriptions (``leaderboard.suites.SUITES``: each suite's quality / test / extra
  metrics take their direction, label and percent scaling from here; an unknown suite's direction too);
* the overview's per-router columns after throughput (:func:`board_metrics`, in declaration order): the per-run
  values, the per-router means, the column header, the cell format, the help text, the best-cell marks and
  the LaTeX export (``paper=True``); the CSV export is the displayed table, so it follows. They and the suite's
  quality / test / extra / throughput columns are one list of specs (``leaderboard.columns.board_columns``);
* verdicts on another metric (``harness compare --metric``, ``claims --along``): :func:`higher_is_better`;
* ``harness regress``'s rules (``tools/regress/gate.RULES``) take the direction a change fails in from here;
* undeclared names (lm-eval tasks' metrics, a plugin suite's): :func:`direction`, the one guessing rule.

**Adding a leaderboard column is one declaration** with a ``board`` header, e.g. the routing fluctuation::

    declare(Metric("fluctuation_last_change", None, False, ".3f", "last change", source="health",
                   board="last change", help="StableMoE's routing fluctuation: when a token's expert last "
                                              "changed, as a fraction of training (0 = never)"))

The training loop does not look names up here: it records each metric with the split of the evaluation
that measured it (``harness.training.recorder``).
"""
from __future__ import annotations

from dataclasses import dataclass

from .catalog import Registry


@dataclass(frozen=True)
class Metric:
    name: str                    # as stored (metrics.name, or routing_health.name for source="health")
    split: str | None            # the split it is measured on (metrics.split); None: not a split's metric
    higher_better: bool | None   # None: no direction (a count, e.g. parameters)
    fmt: str = ".4f"             # a format spec, "si" (1.2k, 3.4M) or "pct" (x 100, shown as a percentage)
    label: str = ""              # human label ("val bpb")
    help: str = ""               # one sentence for tooltips
    board: str | None = None     # the leaderboard overview column header, when the overview shows it
    column: str | None = None    # the overview's column key, when not the name
    source: str = "metric"       # "metric" (per run) | "health" (routing health at the run's last evaluation)
    layers: str = "mean"         # health metrics: how layers are combined ("mean" | "sum")
    paper: bool = False          # also a column of the LaTeX export

    @property
    def key(self) -> str:
        return self.column or self.name

    @property
    def percent(self) -> bool:
        return self.fmt == "pct"

    @property
    def arrow(self) -> str:
        return "" if self.higher_better is None else "↑" if self.higher_better else "↓"


METRICS: Registry[Metric] = Registry("metric")


def declare(m: Metric) -> Metric:
    """Add ``m`` (a later declaration of the same name replaces it)."""
    return METRICS.add(m.name, m)


def get(name: str) -> Metric | None:
    """The declaration of ``name`` (a budget's ``val_bpb@250`` is ``val_bpb``'s), or None."""
    base = name.rpartition("@")[0] or name
    return METRICS.entries[base].obj if base in METRICS.entries else None


def higher_is_better(name: str) -> bool | None:
    """The declared direction of ``name``; None when undeclared or without a direction."""
    m = get(name)
    return None if m is None else m.higher_better


# names whose metric is lower-better, for metrics nobody declared (lm-eval tasks' own metrics, a plugin suite's)
LOWER_BETTER_HINTS = ("ppl", "perplexity", "bpb", "bits", "loss", "error", "err")


def direction(name: str) -> bool | None:
    """Whether higher is better: the declaration's direction when ``name`` is declared (None: it has none),
    else the one rule for undeclared names: lower-better if it contains one of :data:`LOWER_BETTER_HINTS`."""
    m = get(name)
    return m.higher_better if m is not None else guess_higher_better(name)


def guess_higher_better(name: str) -> bool:
    """The one guess for a name nobody declared: lower-better if it contains one of :data:`LOWER_BETTER_HINTS`."""
    return not any(h in name.lower() for h in LOWER_BETTER_HINTS)


def board_metrics() -> list[Metric]:
    """The overview's declared per-router columns, in declaration order."""
    return [e.obj for e in METRICS.entries.values() if e.obj is not None and e.obj.board]


# -- the LM suite (harness.suites.lm) ------------------------------------------------------------------------
for _s in ("val", "test"):
    declare(Metric(f"{_s}_bpb", _s, False, ".4f", f"{_s} bpb",
                   help=f"bits per byte of the {_s} split (= BPC on enwik8/text8)"))
    declare(Metric(f"{_s}_byte_ppl", _s, False, ".3f", f"{_s} byte ppl", help=f"per-byte perplexity, {_s} split"))
    declare(Metric(f"{_s}_word_ppl", _s, False, ".4g", f"{_s} word ppl",
                   help=f"per-word perplexity (WikiText convention: whitespace words), {_s} split"))
    declare(Metric(f"{_s}_tok_ppl", _s, False, ".3f", f"{_s} token ppl",
                   help=f"per-token perplexity (subword tokenizers only), {_s} split"))
# -- the vision suite (harness.suites.vision) ----------------------------------------------------------------
    declare(Metric(f"{_s}_top1", _s, True, "pct", f"{_s} top-1", help=f"top-1 accuracy, {_s} split"))
    declare(Metric(f"{_s}_top5", _s, True, "pct", f"{_s} top-5", help=f"top-5 accuracy (top-min(5, classes)), {_s} split"))
    declare(Metric(f"{_s}_loss", _s, False, ".4f", f"{_s} loss", help=f"mean cross-entropy (nats), {_s} split"))

# -- every run (harness.training.recorder) ------------------------------------------------------------------
declare(Metric("train_tok_per_s", None, True, "si", "tok/s", help="training throughput, tokens per second"))
declare(Metric("train_img_per_s", None, True, "si", "img/s", help="training throughput, images per second"))

# -- the overview's per-router columns after throughput, in this order (board=...) --------------------------
declare(Metric("peak_mem_mb", None, False, ",.0f", "peak memory (MB)", board="peak MB",
               help="peak memory during training"))
declare(Metric("params_total", None, None, "si", "parameters", board="params", column="params",
               help="parameters of the whole model"))
declare(Metric("dead_experts", None, False, ",.1f", "dead experts", board="dead", source="health", layers="sum",
               help="experts with no routed token at the final evaluation, summed over layers"))
declare(Metric("load_entropy", None, True, ",.3f", "load entropy", board="entropy", source="health", paper=True,
               help="expert-load entropy / log E at the final evaluation (1 = uniform)"))
declare(Metric("max_over_mean_load", None, False, ",.2f", "max/mean load", board="max/mean", source="health",
               help="busiest expert's load ÷ mean"))
