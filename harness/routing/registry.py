"""Router registry: decorator, entry points, lazy lookup, did-you-mean.

Modelled on lm-eval's registry: names map to classes; entries coming from
other packages stay lazy strings (``"pkg.module:Class"``) until first use, so a
broken plugin never stops the others from working.

    @register_router("myrouter")
    class MyRouter(Router): ...

From another package, in its ``pyproject.toml``::

    [project.entry-points."moe_harness.routers"]
    myrouter = "mypkg.routers:MyRouter"

Named variants: a router class may declare ``variants = {"paper": {...}, "code": {...}}``
(sets of its keyword hyper-parameters). ``get_router("moge@paper")`` returns a
subclass of the router whose constructor defaults are those values (explicit
keyword arguments still win), registered nowhere but cached here; its
``router_name`` is ``"moge@paper"``, so runs, spec hashes, the store and the
leaderboard keep the readings apart. An unknown variant is an
:class:`UnknownRouterError` naming the known ones.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil
from importlib import metadata
from typing import Any, Callable, TypeVar

from ..catalog import Entry, Registry, did_you_mean, import_target
from ..errors import UserError
from .router import Router

ENTRY_POINT_GROUP = "moe_harness.routers"
# The built-in routers live in the top-level package ``baselines``, which sits ABOVE this module in the
# layer contract (pyproject.toml [tool.importlinter]: baselines may import harness.routing, not the reverse).
# They are therefore loaded the way a plugin is -- by name, at run time, on the first lookup -- and never
# imported statically here: this constant and :func:`_load_builtins` are the one place that does it, on
# purpose (import-linter checks static imports only; docs/architecture.md, "Layers").
BUILTIN_PACKAGE = "baselines"  # every module in it is imported once, registering its router


class UnknownRouterError(UserError, KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


class PluginLoadError(UserError, ImportError):
    pass


_Entry = Entry  # origin: "built-in", "package <dist>" or "user"; obj: the class; target: lazy "module:Class"

_loaded_builtins = False
_loaded_entry_points = False
_current_origin = "user"

R = TypeVar("R", bound=type)


def register_router(name: str) -> Callable[[R], R]:
    """Class decorator registering a :class:`Router` under ``name``; returns the class unchanged."""
    if not isinstance(name, str) or not name:
        raise ValueError("register_router needs a non-empty name")

    def deco(cls: R) -> R:
        if not (isinstance(cls, type) and issubclass(cls, Router)):
            raise TypeError(f"@register_router({name!r}) must decorate a subclass of harness.routing.router.Router, got {cls!r}")
        existing = ROUTERS.entries.get(name)
        if existing is not None and existing.obj is not None and existing.obj is not cls:
            same_def = (existing.obj.__module__, existing.obj.__qualname__) == (cls.__module__, cls.__qualname__)
            if not same_def:  # re-importing the same module (e.g. importlib.reload) is not a clash
                raise ValueError(
                    f"router name {name!r} is already registered by {existing.obj.__module__}.{existing.obj.__qualname__} "
                    f"({existing.origin}); pick another name"
                )
        cls.router_name = name  # type: ignore[attr-defined]
        if existing is not None and existing.target:
            origin = existing.origin
        elif cls.__module__.split(".")[0] == BUILTIN_PACKAGE:
            origin = "built-in"  # also when a baseline module is imported before the registry loads them
        else:
            origin = _current_origin
        ROUTERS.add(name, cls, origin)
        return cls

    return deco


def unregister_router(name: str) -> None:
    """Remove a router (tests and interactive use)."""
    ROUTERS.remove(name)


def _load_builtins() -> None:
    global _loaded_builtins, _current_origin
    if _loaded_builtins:
        return
    _loaded_builtins = True
    prev, _current_origin = _current_origin, "built-in"
    try:
        pkg = importlib.import_module(BUILTIN_PACKAGE)
        for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
            importlib.import_module(f"{BUILTIN_PACKAGE}.{info.name}")
    finally:
        _current_origin = prev


def _load_entry_points() -> None:
    global _loaded_entry_points
    if _loaded_entry_points:
        return
    _loaded_entry_points = True
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in ROUTERS.entries:
            continue  # built-ins win; a plugin cannot silently shadow them
        dist = getattr(ep, "dist", None)
        dist_name = getattr(dist, "name", None) or "?"
        ROUTERS.add_lazy(ep.name, ep.value, origin=f"package {dist_name}")


def refresh_entry_points() -> None:
    """Re-scan installed packages (after installing a plugin in the same process)."""
    global _loaded_entry_points
    _loaded_entry_points = False
    _load_entry_points()


ROUTERS: Registry[type[Router]] = Registry("router", error=UnknownRouterError,
                                            loaders=(_load_builtins, _load_entry_points))
_REGISTRY = ROUTERS.entries  # name -> Entry (kept under its old name)


def _ensure_loaded() -> None:
    _load_builtins()
    _load_entry_points()


def _resolve(entry: Entry) -> type[Router]:
    if entry.obj is not None:
        return entry.obj
    assert entry.target is not None
    global _current_origin
    prev, _current_origin = _current_origin, entry.origin
    try:
        obj: Any = import_target(entry.target)
    except Exception as exc:  # noqa: BLE001 - any failure inside a plugin is reported, not raised raw
        entry.error = f"{type(exc).__name__}: {exc}"
        raise PluginLoadError(
            f"router plugin {entry.name!r} ({entry.origin}, entry point "
            f"{ENTRY_POINT_GROUP}:{entry.name} = {entry.target!r}) failed to load: {entry.error}. "
            f"Fix or uninstall that package; the other routers still work."
        ) from exc
    finally:
        _current_origin = prev
    if not (isinstance(obj, type) and issubclass(obj, Router)):
        entry.error = f"{entry.target} is not a harness.routing.router.Router subclass"
        raise PluginLoadError(f"router plugin {entry.name!r} ({entry.origin}): {entry.error}")
    obj.router_name = entry.name  # type: ignore[attr-defined]
    # the module may have used @register_router itself; keep the entry-point origin
    ROUTERS.add(entry.name, obj, entry.origin, target=entry.target)
    return obj


def router_names() -> list[str]:
    """Registered routers (base names; their variants are in :func:`variant_names`)."""
    return ROUTERS.names()


VARIANT_SEP = "@"
_VARIANT_PREFIX = "Variant:"
_VARIANT_CLASSES: dict[tuple[type, str], type[Router]] = {}


def split_router_name(name: str) -> tuple[str, str | None]:
    """``"moge@paper"`` -> ``("moge", "paper")``; ``"moge"`` -> ``("moge", None)``."""
    base, sep, variant = name.partition(VARIANT_SEP)
    return base, (variant if sep else None)


def _variant_class(base_cls: type[Router], base_name: str, variant: str) -> type[Router]:
    """A subclass of ``base_cls`` whose hyper-parameter defaults are the variant's values (cached)."""
    key = (base_cls, variant)
    cached = _VARIANT_CLASSES.get(key)
    if cached is not None:
        return cached
    preset = dict(base_cls.variants[variant])
    sig = inspect.signature(base_cls.__init__)
    unknown = sorted(set(preset) - set(base_cls.hparam_names()))
    if unknown:
        raise TypeError(f"router {base_name!r}: variant {variant!r} sets unknown hyper-parameter(s) {', '.join(unknown)}")
    params = [p.replace(default=preset[p.name]) if p.name in preset else p for p in sig.parameters.values()]

    @functools.wraps(base_cls.__init__)
    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: N807
        bound = sig.bind_partial(self, *args, **kwargs)
        base_cls.__init__(self, *args, **{**{k: v for k, v in preset.items() if k not in bound.arguments}, **kwargs})

    __init__.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    name = f"{base_name}{VARIANT_SEP}{variant}"
    settings = ", ".join(f"{k}={v!r}" for k, v in preset.items()) or "the defaults"
    desc = f"{base_name} variant {variant!r}: {settings}"
    # Found by pickle as harness.routing.registry.<_VARIANT_PREFIX + name> (module __getattr__ below), so a variant
    # travels to --jobs worker processes and spawn-started ranks by reference, like any router class.
    cls = type(_VARIANT_PREFIX + name, (base_cls,), {
        "__init__": __init__, "__module__": __name__, "__qualname__": _VARIANT_PREFIX + name,
        "__doc__": base_cls.__doc__,
        "description": desc, "router_name": name, "base_router": base_name, "variant": variant,
        "variant_args": preset, "variants": {},
    })
    _VARIANT_CLASSES[key] = cls
    return cls


def __getattr__(attr: str) -> Any:
    """``Variant:<name@variant>``: the variant's class (how pickle finds it, PEP 562)."""
    if attr.startswith(_VARIANT_PREFIX):
        return get_router(attr[len(_VARIANT_PREFIX):])
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def variant_names(name: str | None = None) -> list[str]:
    """``name@variant`` for every declared variant (of one router, or of all); broken plugins are skipped."""
    _ensure_loaded()
    out = []
    for base in ([name] if name else sorted(_REGISTRY)):
        try:
            cls = get_router(base)
        except PluginLoadError:
            continue
        out += [f"{base}{VARIANT_SEP}{v}" for v in sorted(getattr(cls, "variants", {}) or {})]
    return out


def router_defaults(name: str) -> dict[str, Any]:
    """The hyper-parameter defaults ``name`` (or ``name@variant``) resolves to; part of every spec hash.

    A change of a router's defaults therefore re-keys its runs: the store does not skip
    them as already finished, and regression goldens report SPEC-CHANGED.
    """
    return {k: v for k, v in get_router(name).hparam_defaults().items() if v is not inspect.Parameter.empty}


def variant_args(name: str) -> dict[str, Any]:
    """The hyper-parameters a ``name@variant`` sets ({} for a plain name)."""
    return dict(getattr(get_router(name), "variant_args", {}) or {}) if split_router_name(name)[1] else {}


def get_router(name: str) -> type[Router]:
    """The router class registered as ``name``; unknown names get the known list and a suggestion.

    ``name@variant`` gives the router with the variant's hyper-parameters as defaults.
    """
    _ensure_loaded()
    base, variant = split_router_name(name)
    if variant is not None:
        cls = get_router(base)
        known = sorted(getattr(cls, "variants", {}) or {})
        if variant not in known:
            hint = did_you_mean(variant, known, quote=lambda v: f"'{base}{VARIANT_SEP}{v}'")
            raise UnknownRouterError(
                f"unknown variant {variant!r} of router {base!r}.{hint} "
                f"Known variants: {', '.join(known) if known else '(none)'}"
            )
        return _variant_class(cls, base, variant)
    return _resolve(ROUTERS.entry(name))


def create_router(name: str, d_model: int, num_experts: int, top_k: int, **hparams: Any) -> Router:
    """Build a router by name; an unknown hyper-parameter is an error naming the valid keys."""
    cls = get_router(name)
    valid = cls.hparam_names()
    unknown = sorted(set(hparams) - set(valid))
    if unknown:
        raise TypeError(
            f"router {name!r} got unknown hyper-parameter(s) {', '.join(unknown)}; "
            f"valid keys: {', '.join(valid) or '(none)'}"
        )
    return cls(d_model, num_experts, top_k, **hparams)


def describe_routers() -> list[dict[str, str]]:
    """Rows for ``harness routers``: name, description, origin; broken plugins are listed with their error."""
    _ensure_loaded()
    rows = []
    for name in sorted(_REGISTRY):
        entry = _REGISTRY[name]
        try:
            cls = _resolve(entry)
            desc = (cls.description or (cls.__doc__ or "").strip().splitlines()[0] if (cls.description or cls.__doc__) else "")
            rows.append({"name": name, "description": desc, "origin": entry.origin})
            for v in sorted(getattr(cls, "variants", {}) or {}):
                vname = f"{name}{VARIANT_SEP}{v}"
                rows.append({"name": vname, "description": get_router(vname).description, "origin": entry.origin})
        except PluginLoadError:
            rows.append({"name": name, "description": f"BROKEN: {entry.error}", "origin": entry.origin})
    return rows
