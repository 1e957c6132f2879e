"""Throughput judged against the base revision, on this machine, in this invocation.

Like asv's ``continuous`` and TorchBench's A/B runs: the base revision is
materialised in a temporary ``git worktree``; then fresh processes alternate
between the base tree and the current working tree (A B A B ...), each running
``python -m harness.tools.regress.worker`` with its own tree first on ``PYTHONPATH``
and measuring, in-process, each router's layer time over the dense FFN's. The two
samples of ratios (one per process) are compared with a one-sided Mann-Whitney U
test. A router fails when BOTH hold:

* p < ``ALPHA`` that the current ratios are larger than the base ratios, and
* the median ratio grew by more than ``min_effect`` (default 10%).

No number recorded on another machine is ever compared against. When the base
revision is not in this clone (a shallow clone, a rewritten history) or predates
the worker protocol, throughput is SKIPPED with the reason: never a failure.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from scipy.stats import mannwhitneyu

import harness

MARKER = "REGRESS-RATIOS "  # the worker's output line (worker.py); not imported from it, so
                           # `python -m harness.tools.regress.worker` finds it unimported
ALPHA = 0.01           # shared machines: p < 0.05 alone fired on unchanged code
MIN_EFFECT = 0.10      # the smallest slowdown that counts
ROUNDS = 7             # processes per tree: at 5 vs 5 only 1 of 25 pairs may be out of order for p < 0.01, and a
                       # real +22% slowdown on a busy CI machine (3 out of order, p = 0.028) passed; 7 vs 7 allows 6 of 49
MIN_ROUNDS = 5         # 4 vs 4 cannot go below p = 1/70 = 0.014 > ALPHA
REPEATS = 5            # interleaved repeats inside one process (its sample is their median; bench minimum 5)
BENCH = dict(tokens=2048, d_model=128, d_ff=256, num_experts=8, top_k=2)
WORKER_TIMEOUT_S = 300


class Skip(Exception):
    """Throughput cannot be judged here (the reason is shown, the gate does not fail)."""


@dataclass
class ABResult:
    base_rev: str
    base: dict[str, list[float]] = field(default_factory=dict)      # router -> one ratio per base process
    current: dict[str, list[float]] = field(default_factory=dict)   # router -> one ratio per current process
    skipped: str | None = None


def _git(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=check)


def package_tree() -> Path:
    """The source tree the running ``harness`` package was imported from."""

    return Path(harness.__path__[0]).resolve().parent


def repo_root(tree: Path) -> Path | None:
    try:
        out = _git(tree, "rev-parse", "--show-toplevel")
    except (OSError, subprocess.CalledProcessError):
        return None
    return Path(out.stdout.strip())


def head_revision(tree: Path) -> str | None:
    try:
        return _git(tree, "rev-parse", "HEAD").stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def tree_is_dirty(tree: Path) -> bool:
    """Uncommitted changes to tracked code (the golden file itself does not count)."""
    try:
        out = _git(tree, "status", "--porcelain", "--untracked-files=no").stdout
    except (OSError, subprocess.CalledProcessError):
        return False
    return any(not line[3:].startswith("tasks/regress/") for line in out.splitlines() if line.strip())


def resolve_base(repo: Path, rev: str | None) -> str:
    """The full sha of ``rev`` in ``repo``, or Skip with the reason."""
    if not rev:
        raise Skip("no base revision: the golden file names none and --base was not given")
    if repo_root(repo) is None:
        raise Skip(f"{repo} is not a git checkout, so base revision {rev[:12]} cannot be materialised")
    try:
        return _git(repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}").stdout.strip()
    except subprocess.CalledProcessError:
        raise Skip(f"base revision {rev[:12]} is not in this clone (shallow clone or rewritten history); "
                   f"fetch it or pass --base REV") from None


class BaseWorktree:
    """``git worktree add --detach`` of the base revision in a temp dir; removed on exit."""

    def __init__(self, repo: Path, rev: str) -> None:
        self.repo, self.rev = repo, rev
        self.tmp = Path(tempfile.mkdtemp(prefix="harness-regress-base-"))
        self.path = self.tmp / "base"

    def __enter__(self) -> Path:
        res = _git(self.repo, "worktree", "add", "--detach", "--force", str(self.path), self.rev, check=False)
        if res.returncode != 0:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise Skip(f"could not materialise base revision {self.rev[:12]}: {res.stderr.strip().splitlines()[-1:]}")
        if worker_module(self.path) is None:
            self.__exit__()
            raise Skip(f"base revision {self.rev[:12]} predates the A/B worker (harness/tools/regress/worker.py); "
                       f"pass a newer --base")
        return self.path

    def __exit__(self, *exc: object) -> None:
        _git(self.repo, "worktree", "remove", "--force", str(self.path), check=False)
        shutil.rmtree(self.tmp, ignore_errors=True)
        _git(self.repo, "worktree", "prune", check=False)


# Where the worker lives in a tree: the package moved under tools/ (issue 15); a base revision from before
# that move keeps its own path, so the A/B still runs against it.
WORKER_MODULES = ("harness.tools.regress.worker", "harness.regress.worker")


def worker_module(tree: Path) -> str | None:
    for mod in WORKER_MODULES:
        if (tree / (mod.replace(".", "/") + ".py")).exists():
            return mod
    return None


def run_worker(tree: Path, routers: list[str], repeats: int, bench: dict, threads: int = 1) -> dict[str, float]:
    """One fresh process timing ``tree``'s layers; router -> median ratio to dense."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tree), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", worker_module(tree) or WORKER_MODULES[0], "--routers", ",".join(routers),
           "--bench", json.dumps(bench), "--repeats", str(repeats), "--threads", str(threads)]
    try:
        res = subprocess.run(cmd, cwd=str(tree), env=env, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"throughput worker in {tree} took over {WORKER_TIMEOUT_S} s") from None
    for line in res.stdout.splitlines():
        if line.startswith(MARKER):
            payload = json.loads(line[len(MARKER):])
            if Path(payload["tree"]).resolve().parent != tree.resolve():
                raise RuntimeError(f"throughput worker imported harness from {payload['tree']}, not {tree}")
            return payload["ratios"]
    tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
    raise RuntimeError(f"throughput worker in {tree} failed (exit {res.returncode}): {tail}")


def measure_ab(current_tree: Path, base_rev: str | None, routers: list[str], rounds: int = ROUNDS,
               repeats: int = REPEATS, bench: dict | None = None,
               log: Callable[[str], None] = lambda s: None) -> ABResult:
    """Alternate base and current tree processes; per router one ratio per process and tree."""
    bench = dict(bench or BENCH)
    try:
        sha = resolve_base(current_tree, base_rev)
    except Skip as exc:
        return ABResult(base_rev or "", skipped=str(exc))
    out = ABResult(sha)
    try:
        with BaseWorktree(repo_root(current_tree) or current_tree, sha) as base_tree:
            log(f"regress: throughput A/B, base {sha[:12]} ({base_tree}) vs current {current_tree}, "
                f"{rounds} rounds x {repeats} repeats, routers {','.join(routers)}")
            for r in range(rounds):
                # alternate which tree goes first, so a drift in machine state favours neither
                order = [("base", base_tree), ("current", current_tree)]
                if r % 2:
                    order.reverse()
                for side, tree in order:
                    try:
                        ratios = run_worker(tree, routers, repeats, bench)
                    except RuntimeError as exc:
                        if side == "base":  # nothing to judge against: not the current code's fault
                            raise Skip(f"the base revision could not be timed: {exc}") from None
                        raise
                    dest = out.base if side == "base" else out.current
                    for router, v in ratios.items():
                        dest.setdefault(router, []).append(v)
                log(f"regress: throughput round {r + 1}/{rounds}: " + ", ".join(
                    f"{x} {statistics.median(out.base.get(x, [float('nan')])):.3f}->"
                    f"{statistics.median(out.current.get(x, [float('nan')])):.3f}" for x in routers))
    except Skip as exc:
        return ABResult(sha, skipped=str(exc))
    return out


def mann_whitney_greater(new: list[float], old: list[float]) -> float:
    """One-sided p-value that ``new`` tends to be larger than ``old``."""

    return float(mannwhitneyu(new, old, alternative="greater").pvalue)


def judge_speed(router: str, base: list[float] | None, current: list[float] | None,
                min_effect: float = MIN_EFFECT, alpha: float = ALPHA) -> tuple[str, float | None, float | None, str]:
    """(status, current median, base median, detail) for one router's ratios."""
    if not current:
        return "FAIL", None, None, "no throughput sample from the current tree"
    if not base:
        return "NO-BASE", statistics.median(current), None, "router absent from the base revision: not judged"
    m_new, m_old = statistics.median(current), statistics.median(base)
    p = mann_whitney_greater(current, base)
    grew = m_new / m_old - 1
    bad = p < alpha and grew > min_effect
    return ("FAIL" if bad else "pass", m_new, m_old,
            f"{grew:+.1%} vs base (p={p:.3g}, n={len(current)}+{len(base)}; fails if p<{alpha} and >{min_effect:.0%})")
