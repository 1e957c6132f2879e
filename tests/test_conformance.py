"""Conformance over EVERY registered router: new routers and plugins are covered with no new test code."""
import pytest
import torch
from torch import nn

from harness import conformance
from harness.conformance import check_empty_batch, check_fp32_routing, check_model_keeps_router_init, check_router
from harness.routing.registry import register_router, router_names, unregister_router, variant_names
from harness.routing.router import Router, Routing


@pytest.mark.parametrize("name", router_names())
def test_router_conformance(name):
    check_router(name)


@pytest.mark.parametrize("name", variant_names())
def test_variant_conformance(name):
    """Every named variant (``name@variant``) is a router of its own and passes the same checks."""
    check_router(name)


class _Bf16Gate(Router):
    """The bug conformance must catch: an nn.Linear gate under autocast, upcast afterwards."""

    def __init__(self, d_model, num_experts, top_k):
        super().__init__(d_model, num_experts, top_k)
        self.gate = nn.Linear(d_model, num_experts, bias=False)

    def forward(self, x, ctx):
        logits = self.gate(x).float()
        probs = logits.softmax(-1)
        w, idx = probs.topk(self.top_k, -1)
        return Routing(indices=idx, weights=w, logits=logits)


class _NanOnEmpty(_Bf16Gate):
    def forward(self, x, ctx):
        r = super().forward(x.float(), ctx)
        r.aux_losses = {"balance": r.weights.mean()}  # mean over zero tokens: NaN
        return r


@pytest.fixture
def temp_router():
    names = []

    def reg(name, cls):
        register_router(name)(cls)
        names.append(name)
        return name

    yield reg
    for n in names:
        unregister_router(n)


def test_fp32_routing_check_catches_a_bf16_gate(temp_router):
    name = temp_router("__bf16gate", _Bf16Gate)
    with pytest.raises(AssertionError, match="autocast"):
        check_fp32_routing(name)


def test_empty_batch_check_catches_nan(temp_router):
    name = temp_router("__nanempty", _NanOnEmpty)
    with pytest.raises(AssertionError, match="T=0"):
        check_empty_batch(name)


def test_router_init_check_catches_a_model_that_reinitialises(monkeypatch):
    from harness.models import lm

    class Reinit(lm.MoEDecoderLM):  # the old behaviour: every nn.Embedding to N(0, 0.02)
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            for m in self.modules():
                if isinstance(m, nn.Embedding):
                    nn.init.normal_(m.weight, std=0.02)

    monkeypatch.setattr(lm, "MoEDecoderLM", Reinit)
    with pytest.raises(AssertionError, match="re-initialised router parameter 'distill_embedding.weight'"):
        check_model_keeps_router_init("stablemoe")
    check_model_keeps_router_init("smoe")  # no embedding in its router: nothing to catch


def test_conformance_module_exports_the_new_checks():
    for fn in ("check_fp32_routing", "check_empty_batch", "check_model_keeps_router_init"):
        assert callable(getattr(conformance, fn))
    assert torch.get_default_dtype() == torch.float32
