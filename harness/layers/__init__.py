"""The FFN layers every router runs on (imports only ``harness.routing``, ``harness.args``, ``harness.errors``).

``ffn`` activation and init rule · ``experts`` the expert bank · ``moe_layer`` the MoE layer as named
steps (route -> permute -> run_experts -> combine) · ``dense`` the equal-FLOP dense FFN ·
``expert_parallel`` experts sharded over ranks · ``config`` ``MoEConfig`` (the FFN side of a model, its rules) ·
``build`` ``build_ffn`` · ``moe`` all public names.
"""
