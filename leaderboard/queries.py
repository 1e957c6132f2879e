"""Transitional: the leaderboard's data layer now lives in ``leaderboard.store`` (loaders), ``leaderboard.stats``,
``leaderboard.overview`` and ``leaderboard.tables``. These re-exports keep the two remaining outside callers
working (tests/test_soak.py: the loaders; benchmarks/dense_vs_one_expert.py: welch); delete this module once
they import from the new modules."""
from leaderboard.stats import welch
from leaderboard.store import load_curves, load_health, load_metrics, load_runs, store_state

__all__ = ["load_curves", "load_health", "load_metrics", "load_runs", "store_state", "welch"]
