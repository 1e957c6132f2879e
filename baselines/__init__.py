"""Built-in routers: one file per published method (plus the dense baseline).

Importing a module registers its router; ``harness.routing.registry`` imports them lazily.
"""
