"""``harness run --sweep KEY=V1,V2,...``: the points of a sweep (issue 28; docs/along.md).

Pure functions. :func:`parse_sweeps` reads the options and rejects what cannot be one sweep; :func:`points`
takes the Cartesian product of the values. Each point is a list of ``--set`` items: the values are passed on
exactly as typed, so :func:`harness.spec.load_suite` parses and validates them as it parses ``--set`` (one
parser, one set of error messages), and a point is an ordinary spec with an ordinary spec hash.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterable, Sequence

import yaml

from .spec import SpecError

# keys a sweep cannot take: the suite, its preset, routers and seeds have options of their own (and routers and
# seeds are already dimensions of every point)
OWN_OPTION = {"suite": "--suite", "preset": "--preset", "routers": "--routers", "seeds": "--seeds"}
EXAMPLE = "e.g. --sweep model.num_experts=4,8,16"


@dataclass(frozen=True)
class Sweep:
    key: str
    values: tuple[str, ...]  # as typed


@dataclass(frozen=True)
class Point:
    """One combination of the swept values: ``((key, value as typed), ...)`` in the order the sweeps were given."""
    items: tuple[tuple[str, str], ...]

    @property
    def overrides(self) -> list[str]:
        """The point as ``--set`` items."""
        return [f"{k}={v}" for k, v in self.items]

    @property
    def label(self) -> str:
        """``model.num_experts=8 model.top_k=1``."""
        return " ".join(self.overrides)


def split_values(text: str) -> list[str]:
    """``4,8,16`` -> ``['4', '8', '16']``; commas inside brackets or quotes belong to the value, so a list-valued
    key sweeps too: ``[250,500],[500,1000]`` -> ``['[250,500]', '[500,1000]']``."""
    out, cur, depth, quote = [], [], 0, ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth = max(0, depth - 1)
        elif ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    out.append("".join(cur).strip())
    return out


def _parsed(value: str) -> object:
    """The value as ``--set`` reads it (YAML), to spot ``4`` listed twice as ``4`` and ``4.0``."""
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def parse_sweep(item: str) -> Sweep:
    """One ``--sweep`` option."""
    if "=" not in item:
        raise SpecError(f"--sweep {item!r}: expected KEY=V1,V2,..., {EXAMPLE}")
    key, _, text = item.partition("=")
    key = key.strip()
    if not key:
        raise SpecError(f"--sweep {item!r}: no key before '=', {EXAMPLE}")
    if key in OWN_OPTION:
        raise SpecError(f"--sweep {key}: give {key} with {OWN_OPTION[key]}; a sweep varies a spec key such as "
                        f"model.num_experts")
    if "." not in key:
        raise SpecError(f"--sweep {key}: sweep one key of the section, e.g. --sweep {key}.<name>=V1,V2")
    values = split_values(text)
    if not text.strip() or any(v == "" for v in values):
        raise SpecError(f"--sweep {key}: empty value in {text!r}; list the values separated by commas, {EXAMPLE}")
    seen: list[tuple[object, str]] = []
    for v in values:
        p = _parsed(v)
        for q, w in seen:
            if p == q and isinstance(p, bool) == isinstance(q, bool):  # 4 and 4.0 alike, True and 1 not
                raise SpecError(f"--sweep {key}: {v} and {w} are the same value; each point runs once")
        seen.append((p, v))
    return Sweep(key, tuple(values))


def _overlap(a: str, b: str) -> bool:
    """The same key, or one a section of the other (``model`` and ``model.top_k``)."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def parse_sweeps(items: Sequence[str], sets: Iterable[str] = ()) -> list[Sweep]:
    """Every ``--sweep`` option; a key swept twice, or swept and also given with ``--set``, is an error (which
    value would a point take?)."""
    sweeps = [parse_sweep(i) for i in items]
    for i, s in enumerate(sweeps):
        for t in sweeps[:i]:
            if _overlap(s.key, t.key):
                same = "is swept twice" if s.key == t.key else f"overlaps --sweep {t.key}"
                raise SpecError(f"--sweep {s.key} {same}; list all its values in one --sweep {s.key}=V1,V2,...")
    for item in sets:
        k = item.partition("=")[0].strip()
        for s in sweeps:
            if k and _overlap(s.key, k):
                raise SpecError(f"--sweep {s.key} and --set {k} both set {s.key}; give it in one of them")
    return sweeps


def points(sweeps: Sequence[Sweep]) -> list[Point]:
    """The Cartesian product, the first sweep varying slowest (as nested loops in the order given)."""
    return [Point(tuple(zip((s.key for s in sweeps), combo)))
            for combo in itertools.product(*(s.values for s in sweeps))]
