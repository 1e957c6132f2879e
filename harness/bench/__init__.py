"""``harness bench``: speed, phase breakdown, peak memory and router overhead of ONE MoE layer.

The package: ``timing`` (clocks, statistics), ``candidates`` (what is timed), ``steps`` (one timed
step of each kind), ``memory``, ``layer`` (the layer benchmark and its summary), ``scaling`` (the
router alone over a grid), ``report`` (tables, targets, store rows); the command is ``harness.cli.bench``.
This module re-exports their public names; the method is described here.

Two modes:

* ``--mode layer`` (default; also ``harness bench layer``): forward + backward of
  one FFN layer per candidate — each router's :class:`~harness.layers.moe.MoELayer`, the
  equal-active-FLOP dense FFN (router ``dense``: width ``d_ff * k``) and the naive
  per-expert boolean-mask loop most published MoE code uses — with time per phase,
  tokens/s, peak memory, and ratios to ``smoe`` and to ``dense``.
* ``--mode scaling`` (``harness bench scaling``): the router alone (forward +
  backward of its routing weights and aux losses) over a grid of expert counts,
  tokens per batch and model widths, to show what a router's overhead scales
  with (e.g. MoGE's extra cost grows with E and T, not with d_model).

How the numbers are made (DESIGN.md, "Measuring speed honestly")
----------------------------------------------------------------
* One process, interleaved: every repeat runs every candidate once, round-robin,
  the order rotated by one each repeat; ``warmup`` rounds are thrown away. We
  report the median over the repeats and the IQR (75th - 25th percentile) as the
  spread. Ratios are formed *per repeat* (the candidates of one round ran seconds
  apart) and then summarised, which cancels most of a shared machine's drift.
* The layer is exactly the harness layer, built by :func:`harness.layers.build.build_ffn`.
  The headline ``fwd_bwd_ms`` times ``y, routing = layer(x, ctx)`` followed by ONE
  backward of ``y`` (fixed random upstream gradient ``g``) together with the sum of
  ``routing.aux_losses`` — nothing else (parameter grads are reset to None outside
  the timed region, as ``zero_grad(set_to_none=True)`` does). ``x`` requires grad:
  inside a network the layer also returns dL/dx. No optimiser step is taken, so
  every repeat routes the same way (a random-init router on Gaussian inputs);
  ``load_imbalance`` (max/mean slots per expert) says how balanced that was.
* Routers run in training mode with a :class:`~harness.routing.router.RouteContext`
  carrying random ``token_ids`` in [0, 256) (StableMoE routes on them).
* Routers with schedules are measured per variant and amortised:
  CompeteSMoE (any router with a ``competition_prob`` hyper-parameter) once
  forced to compete every step (``competition_prob=1.0, warmup_fraction=0``, and
  ``on_step`` past warm-up) and once never (``competition_prob=0``);
  ``amortised = p * t_compete + (1 - p) * t_plain`` per repeat with p its configured
  rate (default 0.05). This ignores the "at most 3 competing layers per step" cap,
  which can only lower the real cost. StableMoE (``stage1_fraction``): stage 1 and
  stage 2, amortised with the stage-1 fraction (default 0.1).
* Threads: on a shared CPU with more runnable processes than cores, an OpenMP
  parallel region waits at its barrier whenever a sibling thread is descheduled.
  The MoE layer issues ~200 mostly small ops per fwd+bwd, the dense FFN ~10 big
  GEMMs, so oversubscription inflates the MoE/dense ratio far beyond what either
  costs (measured here: 2.3-2.6x at 2 threads under load ~6-12 vs 0.89-0.96x at 1
  thread). The report prints the load average; ``--threads 1`` gives ratios that
  survive a busy machine, and the rows record the thread count.
* A router that does not support the requested top-k (StableMoE is top-1) runs at
  the k it supports and is compared with ``smoe[k=1]`` and ``dense[k=1]`` references
  built at that same k, so every ratio compares equal active FLOPs.

Router overhead
---------------
``ratio_vs_smoe`` divides two whole-layer times; both are dominated by the same
expert GEMMs, so on a noisy machine its IQR is wider than the few ms a router
adds. Each round therefore also times every router ALONE (forward + backward of
its routing weights and aux losses, ``router_fwd_bwd_ms``, median of 3 calls), and
``router_overhead_vs_smoe`` = per repeat ``(t_smoe_layer + t_router - t_smoe_router)
/ t_smoe_layer``: the router's own cost on top of the smoe layer, valid because the
experts and the dispatch are the same kernels for every router. It leaves out the
routing decision's effect on the expert kernels (load imbalance; see
``load_imbalance`` and ``ratio_vs_smoe``). A competition step runs every expert, so
for that variant the layer time itself enters; amortised rows weight the variants.

Phases (``phase_*_ms``), a second, instrumented run per candidate and repeat
---------------------------------------------------------------------------
The instrumented run is the real layer: :func:`~harness.bench.steps.moe_forward_phased`
calls ``layer(x, ctx, mark=...)``, and ``MoELayer.forward`` (``harness/layers/moe_layer.py``)
calls ``mark`` as each of its named steps ends, where the phase clock is read. There is
one implementation of the forward, so the phases time exactly the code ``fwd_bwd_ms``
times. The steps and the phases they are reported as:

  router    ``route``: ``router(x, ctx)``, minus its aux-loss share (below), minus the
            time spent in ``ctx.all_expert_outputs()`` (the layer marks around it, so it
            counts as ``experts``: CompeteSMoE's competition runs every expert there).
  dispatch  ``permute``: bincount, k-major slot order, stable argsort by expert,
            capacity drop, gathering the token rows.
  experts   ``run_experts``: ``ExpertBank.forward_sorted``, the bank's kernel (``loop``:
            ``counts.tolist()``, a host sync, then ``forward_segments``), or ``forward_all``
            for competition.
  combine   ``combine``: scaling by the routing weights and ``index_add_`` back to
            token order (or the gather from the all-expert outputs).
  aux_loss  forward of the router's aux losses (estimated, below) + summing them.
  backward  the whole backward pass — autograd runs it as one graph, so it is not
            split further.

The aux-loss share: routers compute their losses inside ``forward``. In each repeat
we also time ``router(x, ctx)`` alone, as configured and as a copy with every
``*_weight`` hyper-parameter set to 0 (which switches the losses off in all the
built-in routers), and move ``(t_with - t_without) / t_with`` (clipped to [0, 1]) of
that repeat's router phase to ``aux_loss``. Because every phase is a difference of
consecutive clock reads of ONE run, the phases of a repeat sum exactly to that
repeat's instrumented total. The reported ``phase_*_ms`` split the median
instrumented total (``phased_total_ms``) by the median share of each phase
(renormalised), so they add up exactly; raw per-phase medians would not, since
noise bursts land in different phases in different repeats.
The naive loop accumulates its per-expert dispatch/expert/combine steps the same
way; the dense FFN is all ``experts``. On CUDA each clock read synchronises, so the
instrumented run is slower than ``fwd_bwd_ms``; on CPU they agree within noise.

Expert kernels (``--experts-impl loop,loop_recompute,padded_bmm,grouped_mm,auto``)
----------------------------------------------------------------------------------
The unlabelled MoE rows run the default kernel (``loop``). Every other kernel listed adds, per
MoE candidate, a row ``<label>:<kernel>`` built from the same seed, timed in the same interleaved
rounds: ``vs_smoe`` of ``smoe:padded_bmm`` is that kernel against the loop, ``vs_dense`` its
ratio to the equal-FLOP dense FFN (the issue-17 target, <= 1.05). Before timing, each such row's
output is checked against the loop kernel on its own layer (a warning if they disagree).
Store rows carry ``experts_impl`` in their config. The kernels: ``harness/layers/kernels.py``.

GEMM roofline (``roofline_frac``)
--------------------------------
Each round also times the layer's six GEMMs unsplit (``steps.GemmRoofline``: ``X W1``, ``H W2``
and the four backward products, each one ``mm`` over all T*k rows); per repeat
``roofline_frac = t_gemms / t_candidate``: the share of the candidate's time its FLOPs would take
at the rate this machine reaches on those operands (issue 17: >= 0.80 at d 256).

The whole training step
-----------------------
``harness.bench.model_step`` (``benchmarks/model_step.py``) times the training loop's own
``train_step`` on every router's model of a suite preset, interleaved, ratios per round; its
docstring has the method.

Memory, untimed passes per candidate after the timed rounds
-----------------------------------------------------------
* ``peak_mem_mb``: CUDA — ``torch.cuda.max_memory_allocated()`` during the step minus
  the allocation before it. CPU — peak resident set during the step minus the RSS
  before it: ``malloc_trim(0)`` hands freed heap pages back, writing "5" to
  ``/proc/self/clear_refs`` resets the high-water mark, and ``VmHWM`` is read from
  ``/proc/self/status`` afterwards. Allocator-dependent, so approximate; the
  median of ``mem_repeats`` (3) passes.
* ``saved_act_mb``: deterministic — the bytes of the distinct non-parameter storages
  autograd saved for backward (``torch.autograd.graph.saved_tensors_hooks``).

Store rows (``Store.add_perf``): one per (candidate, metric); ``router`` is the
registry name (``naive`` for the loop), ``config`` holds E/k/d/d_ff/tokens/dtype/
mode/variant/device/threads/repeats, ``value`` the median, ``spread`` the IQR.
"""
from __future__ import annotations

from .candidates import (DENSE, DTYPES, NAIVE, REFERENCE, VOCAB, Candidate, Inputs, LayerConfig, build_candidates,
                         impl_label, impl_list, ref_label, resolve_routers, route_context, schedule_variants)
from .layer import CandidateResult, LayerBench, run_layer_bench, summarise_layer
from .memory import SavedBytes, measure_memory
from .report import (TARGETS, check_targets, layer_rows, layer_table, new_bench_id, phase_table, print_layer_report,
                     print_scaling_report, provenance, scaling_rows, scaling_table, write_rows)
from .scaling import ScalingBench, run_scaling_bench
from .steps import (PHASE_OF_STEP, aux_total, moe_forward_phased, naive_forward, router_forward_time,
                    router_step_time, run_phased, run_plain, verify_impl, verify_naive)
from .timing import MIN_REPEATS, PHASES, Clock, Log, PhaseClock, Stat, paired

__all__ = [
    "DENSE", "DTYPES", "MIN_REPEATS", "NAIVE", "PHASES", "PHASE_OF_STEP", "REFERENCE", "TARGETS", "VOCAB",
    "Candidate", "CandidateResult", "Clock", "Inputs", "LayerBench", "LayerConfig", "Log", "PhaseClock",
    "SavedBytes", "ScalingBench", "Stat", "aux_total", "build_candidates", "check_targets", "impl_label",
    "impl_list", "layer_rows",
    "layer_table", "measure_memory", "moe_forward_phased", "naive_forward", "new_bench_id", "paired",
    "phase_table", "print_layer_report", "print_scaling_report", "provenance", "ref_label", "resolve_routers",
    "route_context", "router_forward_time", "router_step_time", "run_layer_bench", "run_phased", "run_plain",
    "run_scaling_bench", "scaling_rows", "scaling_table", "schedule_variants", "summarise_layer", "verify_impl",
    "verify_naive",
    "write_rows",
]
