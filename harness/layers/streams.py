"""Random streams that make a comparison of routers a controlled experiment.

At one seed, two routers' models must start from the same weights for everything they share (embeddings,
attention, norms, the expert bank, the dense baseline's non-FFN parts), and only the router may differ. Built
from one RNG stream in construction order they did not: a router's parameters are drawn in the middle of
model construction, so every tensor built after them moved with the router (issue 27 measured 18 of 28 shared
tensors differing between the smoe and xmoe models at seed 0).

So each block's FFN is built in a stream of its own, keyed by the run's seed and the FFN's path in the model,
and inside it the router in a further stream keyed by the router's name: the main stream (embeddings,
attention, norms, timm's init) never sees how many numbers an FFN or a router drew, the expert bank is drawn
from the FFN's stream before the router draws anything, and a router (or an A/A copy under another name)
gets its own initial weights. The key is hashed, never the construction order, so adding a router, a layer
or a variant changes nothing else.
"""
from __future__ import annotations

import contextlib
import hashlib
from typing import Iterator

import torch

def stream_seed(*key: object) -> int:
    """A 63-bit torch seed from a key, stable across processes and Python versions (sha256, not hash())."""
    digest = hashlib.sha256("/".join(str(k) for k in key).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def base_seed() -> int:
    """The seed the run seeded torch with (``torch.manual_seed(run.seed)`` before the model is built)."""
    return torch.initial_seed()


@contextlib.contextmanager
def rng_stream(*key: object) -> Iterator[None]:
    """Run the block on torch's CPU generator seeded from ``key``; the generator is restored afterwards, as if
    the block had drawn nothing. Models are built on the CPU, so only the CPU generator is forked."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(*key))
        yield
