"""One small registry type for everything the harness looks up by name: routers, suites, metrics, expert
kernels, the leaderboard's suite descriptions.

    ROUTERS = Registry("router", error=UnknownRouterError, loaders=(load_builtins, load_entry_points))
    ROUTERS.add("smoe", SMoERouter, origin="built-in")           # an object now
    ROUTERS.add_lazy("cosine", "my_routers.cosine:Cosine", origin="package my-routers")  # imported on first use
    ROUTERS.get("smoe")        # the object; an unknown name raises ``error`` with a did-you-mean and the list
    ROUTERS.names()            # what exists, sorted

* **Lazy entries** are ``"module:attr"`` strings, imported on the first :meth:`Registry.get` (or by an
  owner's own resolver, e.g. the router registry's, which also checks the class and reports a broken plugin
  without stopping the others).
* **Loaders** run once, on the first lookup: the built-in package's modules, installed entry points.
* **Did-you-mean**: an unknown name is one line naming the closest known name and every known one; its
  exception class is the owner's (``UnknownRouterError``, ``SpecError``, ...), a ``UserError`` so the CLI
  prints it as one line and exits 2.

Used by ``harness.routing.registry`` (routers), ``harness.suites`` (suite adapters), ``harness.metrics``
(metric declarations), ``harness.layers.kernels`` (``KERNELS``: the expert kernels; ``EXPERTS_IMPLS`` is
``auto`` + its names in order) and ``leaderboard.suites`` (``SUITES``: what each suite's board shows).
"""
from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterable, Iterator, TypeVar

from .errors import UserError

T = TypeVar("T")


@dataclass
class Entry(Generic[T]):
    name: str
    origin: str                     # "built-in", "package <dist>", "user", ...
    obj: T | None = None            # the registered object, once known
    target: str | None = None       # lazy "module:attr"
    error: str | None = None        # why a lazy entry failed to load


class Registry(Generic[T]):
    """Name -> object, with lazy entries, loaders that run on first use, and did-you-mean errors."""

    def __init__(self, kind: str, error: type[Exception] = UserError,
                 loaders: Iterable[Callable[[], None]] = ()) -> None:
        self.kind = kind                 # "router", "suite", "metric": how errors name an entry
        self.error = error
        self.entries: dict[str, Entry[T]] = {}
        self._loaders = list(loaders)
        self._loaded = False

    # -- filling it ---------------------------------------------------------------------------------
    def add(self, name: str, obj: T, origin: str = "built-in", target: str | None = None) -> T:
        self.entries[name] = Entry(name=name, origin=origin, obj=obj, target=target)
        return obj

    def add_lazy(self, name: str, target: str, origin: str) -> None:
        """``target`` (``"module:attr"``) is imported on first use."""
        self.entries[name] = Entry(name=name, origin=origin, target=target)

    def remove(self, name: str) -> None:
        self.entries.pop(name, None)

    def ensure_loaded(self) -> None:
        """Run the loaders (once)."""
        if self._loaded:
            return
        self._loaded = True
        for load in self._loaders:
            load()

    # -- looking things up --------------------------------------------------------------------------------
    def names(self) -> list[str]:
        self.ensure_loaded()
        return sorted(self.entries)

    def __contains__(self, name: object) -> bool:
        self.ensure_loaded()
        return name in self.entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def entry(self, name: str) -> Entry[T]:
        """The entry of ``name``; unknown: ``self.error`` with a did-you-mean and the known names."""
        self.ensure_loaded()
        found = self.entries.get(name)
        if found is None:
            raise self.error(self.unknown_message(name))
        return found

    def get(self, name: str) -> T:
        """The object of ``name``, importing a lazy entry on first use."""
        e = self.entry(name)
        if e.obj is None and e.target is not None:
            e.obj = import_target(e.target)
        return e.obj  # type: ignore[return-value]

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def values(self) -> list[T]:
        """Every object, in the order they were added (lazy entries imported)."""
        self.ensure_loaded()
        return [self.get(n) for n in list(self.entries)]

    def items(self) -> list[tuple[str, T]]:
        self.ensure_loaded()
        return [(n, self.get(n)) for n in list(self.entries)]

    def in_order(self) -> tuple[str, ...]:
        """The names in the order they were added (``names()`` is sorted)."""
        self.ensure_loaded()
        return tuple(self.entries)

    def unknown_message(self, name: str, known: list[str] | None = None) -> str:
        known = sorted(self.entries) if known is None else known
        return f"unknown {self.kind} {name!r}.{did_you_mean(name, known)} Known {self.kind}s: {', '.join(known)}"


def did_you_mean(name: str, known: Iterable[str], quote: Callable[[str], str] = repr) -> str:
    """`` Did you mean 'x'?`` for the closest of ``known`` (difflib, cutoff 0.5), else ``""``."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.5)
    return f" Did you mean {quote(close[0])}?" if close else ""


def import_target(target: str) -> Any:
    """``"package.module:attr.sub"`` -> the object (ImportError / AttributeError as raised)."""
    module_name, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in (attr or "").split("."):
        if part:
            obj = getattr(obj, part)
    return obj
