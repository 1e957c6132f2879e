"""A bundles-mode run stopped mid-way (SIGTERM) and continued with ``--resume``: the bundle says ``interrupted``,
the resumed run reaches the uninterrupted run's final metrics, one run, no duplicated curve point, and no
database file is ever opened (issue 34)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from harness.bundles import read_bundle
from harness.cli import main
from storeq import RESUMABLE, RESUME_GROUP, default_sigint, q

FINAL_KEYS = "name IN ('val_bpb','test_bpb','val_byte_ppl','test_byte_ppl')"


def _harness(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "harness.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, preexec_fn=default_sigint)


@pytest.mark.xdist_group(RESUME_GROUP)
def test_bundles_mode_sigterm_then_resume_matches_uninterrupted(tmp_path, uninterrupted_80, capsys):
    never, runs = tmp_path / "never.duckdb", tmp_path / "runs"
    args = [*RESUMABLE, "--store-mode", "bundles", "--store", str(never)]
    p = _harness(*args)
    deadline = time.time() + 180
    while time.time() < deadline and not list(runs.glob("*/ckpt.pt")):
        time.sleep(0.05)
    time.sleep(0.3)
    assert p.poll() is None, "run finished before it could be signalled; make it longer"
    os.kill(p.pid, signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143, err[-2000:]
    (manifest,) = runs.glob("*/bundles/*/manifest.json")
    b = read_bundle(manifest.parent)
    assert b.run["status"] == "interrupted" and "--resume" in b.run["error"]
    assert json.loads(manifest.read_text())["status"] == "interrupted"

    p = _harness(*args, "--resume")
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-2000:]
    assert "resuming" in err and not never.exists()
    assert len(list(runs.glob("*/bundles/*/manifest.json"))) == 1  # the same run continued
    store = tmp_path / "h.duckdb"
    assert main(["import", str(runs), "--store", str(store), "--quiet"]) == 0
    assert q(store, "SELECT count(*), min(status) FROM runs") == [(1, "finished")]
    got = q(store, f"SELECT name, value FROM metrics WHERE {FINAL_KEYS} ORDER BY name")
    want = q(uninterrupted_80, f"SELECT name, value FROM metrics WHERE {FINAL_KEYS} ORDER BY name")
    assert got == want and len(got) == 4
    assert q(store, "SELECT step, name, count(*) c FROM curves GROUP BY step, name HAVING c > 1") == []
    assert q(store, "SELECT count(*) FROM curves WHERE name = 'train_loss'") == \
        q(uninterrupted_80, "SELECT count(*) FROM curves WHERE name = 'train_loss'")
