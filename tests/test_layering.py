"""The package layout holds: imports run only downward through the layers in pyproject.toml
(``[tool.importlinter]``), no module is part of an import cycle (imports inside functions included), and no
module grows past 600 lines. A new upward import or cycle fails here, naming the modules."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("harness", "baselines", "leaderboard")
MAX_LINES = 600


def _graph():
    return grimp.build_graph(*PACKAGES, include_external_packages=False, cache_dir=None)


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            advanced = False
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.find_modules_directly_imported_by(w)))))
                    advanced = True
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_cycle_finder_finds_a_planted_cycle():
    class G:
        modules = {"a", "b", "c", "d"}
        edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}

        def find_modules_directly_imported_by(self, m):
            return self.edges.get(m, set())

    assert _cycles(G()) == [["a", "b", "c"]]


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def _lint(config: Path) -> tuple[int, str]:
    """import-linter's own check (its Python entry point) on a config; (exit code, its report)."""
    res = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports; "
                          f"sys.exit(lint_imports(config_filename={str(config)!r}, no_cache=True))"],
                         cwd=REPO, capture_output=True, text=True)
    return res.returncode, res.stdout[-4000:] + res.stderr[-2000:]


def test_layers_contract_holds():
    rc, report = _lint(REPO / "pyproject.toml")
    assert rc == 0, report
    assert "1 kept, 0 broken" in report, report


def test_layers_contract_catches_an_upward_import(tmp_path):
    """The same contract with training and suites swapped must break (the loop imports the suite protocol):
    the check is not vacuous."""
    text = (REPO / "pyproject.toml").read_text()
    swapped = text.replace('"harness.training",\n    "harness.suites",', '"harness.suites",\n    "harness.training",')
    assert swapped != text
    cfg = tmp_path / "pyproject.toml"
    cfg.write_text(swapped)
    rc, report = _lint(cfg)
    assert rc != 0 and "BROKEN" in report, report


def test_no_module_over_600_lines():
    long = {str(p.relative_to(REPO)): n for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by concern): {long}"
