"""A run's identity: a new run id registered in the store, or -- with ``--resume`` -- the latest unfinished
run of this spec and seed and its checkpoint. Rank 0 decides; every rank gets the same id and checkpoint."""
from __future__ import annotations

import json
import uuid
from typing import Any

from ..spec import RunSpec
from ..store import Store, git_sha, machine_info, now, package_versions
from .checkpoint import Checkpointer
from .distributed import run_info


def open_run(run: RunSpec, store: Store, ckpt: Checkpointer, resume: bool, dctx: Any) -> tuple[str, dict | None]:
    """(run id, the checkpoint state to continue from or None), the same on every rank.

    Resuming: the latest unfinished run with this spec hash and seed, from its checkpoint when the checkpoint
    is that run's (else from step 0), with its rows after the checkpoint's step dropped. Not resuming: a new
    run id, and a stale checkpoint of the same spec and seed deleted (a fresh run never continues it)."""
    run_id, state = None, None
    if not dctx.is_main:
        pass  # rank 0 decides below and tells the others
    elif resume:
        prev = store.find_resumable(run.spec_hash, run.seed)
        if prev is not None:
            run_id = prev["run_id"]
            if ckpt.exists():
                state = ckpt.load()
                if state.get("run_id") != run_id:
                    state = None  # checkpoint of another attempt; start this one over
    else:
        ckpt.discard()
    if run_id is None and dctx.is_main:
        run_id = f"{run.run_key}-{uuid.uuid4().hex[:6]}"
        _register(store, run, run_id, dctx)
    # every rank continues the same run from the same checkpoint (single process: no-ops)
    run_id, has_state = dctx.broadcast((run_id, state is not None))
    if has_state:
        state = ckpt.share(state)
    dctx.barrier()
    if resume and dctx.is_main:
        store.truncate_after(run_id, int(state["step"]) if state else 0)
    return run_id, state


def _register(store: Store, run: RunSpec, run_id: str, dctx: Any) -> None:
    """The run's ``runs`` row (status running) and this machine's ``machines`` row."""
    minfo = machine_info()
    store.register_machine(minfo)
    store.start_run({
        "run_id": run_id, "suite": run.suite, "router": run.router, "spec_hash": run.spec_hash,
        "seed": run.seed, "preset": run.suite_spec.preset, "status": "running", "step": 0,
        "total_steps": run.train.steps, "git_sha": git_sha(), "machine_id": minfo["machine_id"],
        "started_at": now(), "config": json.dumps(run.to_dict(), sort_keys=True, default=str),
        "versions": json.dumps({**package_versions(), **run_info(dctx)}, sort_keys=True),
    })
