import os
import subprocess
import sys

import pytest
import torch

from storeq import RESUMABLE

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# tiny models: one thread is fastest and immune to other processes loading the cores
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _keep_main_module():
    """Streamlit's AppTest runs the board script as ``__main__`` and leaves it there; a ``--jobs`` worker that a
    later test in the same (xdist) process spawns would then re-run that script on start-up (spawn re-imports
    ``__main__``): slower, and broken whenever the page is. Put the real ``__main__`` back after each test."""
    main = sys.modules.get("__main__")
    yield
    if main is not None:
        sys.modules["__main__"] = main


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-tensor formula tests, whatever an earlier test set:
    more threads only add sync overhead (and stall badly on a loaded 2-core box)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="session")
def uninterrupted_80(tmp_path_factory):
    """The store of one uninterrupted ``RESUMABLE`` run, trained once per session (per xdist worker: the tests
    that use it are in one ``RESUME_GROUP``) in its own process, as the interrupted runs are."""
    store = tmp_path_factory.mktemp("uninterrupted_80") / "h.duckdb"
    p = subprocess.run([sys.executable, "-m", "harness.cli", *RESUMABLE, "--store", str(store)],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    return store
