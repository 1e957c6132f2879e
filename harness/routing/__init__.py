"""The router contract: what a router returns (``router``), how it is found (``registry``) and the
shared balance losses routers may add (``losses``). Nothing here knows about experts or dispatch."""
