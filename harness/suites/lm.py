"""The language-modelling suite: decoder LM pretraining on bytes or subword tokens, bits per byte.

Metrics, for every tokenizer (``data.tokenizer``; ``nll`` = the summed natural-log cross-entropy of the
evaluated targets divided by the UTF-8 bytes they stand for, ``sum(byte_lengths[targets])``, which is the
number of targets for the byte tokenizer, so byte numbers are unchanged):
  {split}_bpb       = nll / ln 2                     (bits per byte = BPC for enwik8/text8)
  {split}_byte_ppl  = exp(nll)
  {split}_word_ppl  = exp(nll * bytes / words)       (WikiText-103 convention: per whitespace word)
  {split}_tok_ppl   = exp(summed nll / targets)      (per token; stored for subword tokenizers only)
The word perplexity uses the split's bytes-per-word ratio; it is exact when the
whole split is evaluated (the final test pass always is) and an estimate on
the capped validation passes.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.text import DataError, TextCorpus, get_batch, iter_eval_batches
from ..data.tokens import load_lm_corpus, lm_vocab_size
from ..layers.config import MoEConfig
from ..models.lm import MoEDecoderLM
from ..spec import RunSpec


def build_lm(spec: dict | RunSpec) -> MoEDecoderLM:
    """The model of a run, from a RunSpec or its stored ``to_dict()``: its FFNs from one ``MoEConfig``."""
    d = spec.to_dict() if isinstance(spec, RunSpec) else spec
    m = d["model"]
    return MoEDecoderLM(MoEConfig.from_spec(d), vocab_size=lm_vocab_size(d.get("data") or {}), d_model=m["d_model"],
                        n_layers=m["n_layers"], n_heads=m["n_heads"], context=m["context"], dropout=m["dropout"])


class LMSuite:
    name = "lm"
    unit = "tok"
    primary_metric = "val_bpb"
    lm_eval = True  # eval.tasks run through lm-eval after pretraining (harness.lmeval)

    def __init__(self) -> None:
        self._corpus: TextCorpus | None = None
        self._corpus_key: tuple | None = None

    def corpus(self, run: RunSpec, progress: bool | None = None) -> TextCorpus:
        d = run.data
        key = (d.corpus, d.path, d.strict_size, d.cache_dir, d.tokenizer, d.vocab_size, d.text_field, d.max_tokens)
        if self._corpus is None or self._corpus_key != key:
            self._corpus = load_lm_corpus(dataclasses.asdict(d), progress=progress)
            self._corpus_key = key
        return self._corpus

    def prepare(self, run: RunSpec, progress: bool | None = None) -> TextCorpus:
        """Load (and validate) the run's corpus once, tokenising it into its cache the first time
        (``progress``: a bar meanwhile; None = when stderr is a terminal); every suite adapter has this door."""
        corpus = self.corpus(run, progress)
        need = run.model.context + 1
        for split in ("train", "val", "test"):
            n = len(corpus.split(split))
            if n < need:
                raise DataError(f"{corpus.name}: the {split} split has {n} tokens, fewer than model.context+1 = "
                                f"{need}; give more text (or a larger data.max_tokens) or a shorter model.context")
        return corpus

    def warm_cache(self, run: RunSpec) -> None:
        """A first run tokenises the corpus into its cache (harness.data.tokens): here, without a bar."""
        self.prepare(run, progress=False)

    def build_model(self, run: RunSpec) -> nn.Module:
        return build_lm(run)

    def train_batch(self, run: RunSpec, step: int, device: torch.device) -> tuple[Tensor, Tensor]:
        x, y = get_batch(self.corpus(run).train, run.train.batch_size, run.model.context, step, run.seed)
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    def loss(self, out: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(out.float().reshape(-1, out.shape[-1]), targets.reshape(-1))

    def items(self, inputs: Tensor) -> int:
        return inputs.numel()

    def evaluate(self, model: nn.Module, run: RunSpec, split: str, device: torch.device,
                 hook: Callable[[], None], max_batches: int | None) -> dict[str, float]:
        corpus = self.corpus(run)
        data = corpus.val if split == "val" else corpus.test
        lengths = None if corpus.byte_lengths is None else torch.from_numpy(corpus.byte_lengths).to(device)
        total_nll, total_tok, total_bytes = 0.0, 0, 0
        for x, y in iter_eval_batches(data, run.train.batch_size, run.model.context, max_batches):
            x, y = x.to(device), y.to(device)
            out, _ = model(x, step=0, total_steps=1)
            hook()
            total_nll += float(F.cross_entropy(out.float().reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum"))
            total_tok += y.numel()
            # the UTF-8 bytes the targets stand for (one per target for the byte tokenizer)
            total_bytes += y.numel() if lengths is None else int(lengths[y].sum())
        if total_tok == 0:
            raise ValueError(f"{split} split of {corpus.name} is shorter than one context window ({run.model.context})")
        nll = total_nll / total_bytes
        out = {f"{split}_bpb": nll / math.log(2), f"{split}_byte_ppl": math.exp(min(nll, 50.0))}
        if lengths is not None:
            out[f"{split}_tok_ppl"] = math.exp(min(total_nll / total_tok, 700.0))
        words = corpus.words.get(split, 0)
        if words:
            bytes_per_word = corpus.n_bytes[split] / words
            out[f"{split}_word_ppl"] = math.exp(min(nll * bytes_per_word, 700.0))
        return out
