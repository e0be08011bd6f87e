"""Constrained decoding: each constrained sequence holds a grammar matcher (xgrammar), whose token
mask is applied to that sequence's row of the batch's logits before sampling.

The gateway sends a constraint as one EBNF grammar (``SamplingParams.grammar``), whatever it came
from (a JSON schema, a regex, a choice, the tool calls a request allows). Compiled grammars are kept
in an LRU cache keyed by that text, so the same schema twice compiles once. Compiling runs in the
caller's thread (``AsyncLLMEngine.generate`` runs it on a worker thread), never in the step loop.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

# What the compiled grammars kept may hold, as xgrammar counts them (a compiled grammar holds from
# about a megabyte to tens of them: a token mask for each of its states that needs one).
GRAMMAR_CACHE_BYTES = 256 * 1024 * 1024


class GrammarError(ValueError):
    """A grammar that does not parse or does not compile."""


class Grammars:
    """The grammars of one model's tokenizer: compiled once each, and a matcher per sequence."""

    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self._compiler = None
        self._lock = threading.Lock()
        self._compiled: OrderedDict[str, object] = OrderedDict()  # least recently used first
        self.cached_bytes = self.compiled_count = 0

    @property
    def compiler(self):
        with self._lock:  # the tokenizer's vocabulary is read once, at the first constrained request
            if self._compiler is None:
                import xgrammar as xgr

                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size)
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
                self.allowed = allowed_words(info.decoded_vocab, self.vocab_size)
            return self._compiler

    def compile(self, ebnf: str):
        """``ebnf`` compiled, from the cache when it came before. Two threads that compile the same new
        grammar at once both compile it; the cache keeps one."""
        with self._lock:
            if ebnf in self._compiled:
                self._compiled.move_to_end(ebnf)
                return self._compiled[ebnf]
        import xgrammar as xgr

        try:
            compiled = self.compiler.compile_grammar(xgr.Grammar.from_ebnf(ebnf))
        except RuntimeError as e:
            raise GrammarError(f"grammar: {e}") from e
        with self._lock:
            self.compiled_count += 1
            if ebnf not in self._compiled:
                self._compiled[ebnf] = compiled
                self.cached_bytes += compiled.memory_size_bytes
            while self.cached_bytes > GRAMMAR_CACHE_BYTES:
                self.cached_bytes -= self._compiled.popitem(last=False)[1].memory_size_bytes
        return compiled

    def matcher(self, compiled, stop_token_ids: tuple[int, ...]) -> Matcher:
        import xgrammar as xgr

        # The grammar may end only with one of the sequence's own stop tokens.
        return Matcher(xgr.GrammarMatcher(compiled, override_stop_tokens=list(stop_token_ids) or None), self.allowed)


def allowed_words(decoded_vocab: list[bytes], vocab_size: int) -> torch.Tensor:
    """A bitmask row (xgrammar's layout) of every token but the single control bytes other than
    tab and line ends. xgrammar 0.2 lets a sentencepiece byte-fallback token such as ``<0x1A>``
    into a JSON string after other byte tokens, which makes JSON no parser takes; no grammar a
    request sends needs one."""
    import xgrammar as xgr

    words = torch.full((xgr.get_bitmask_shape(1, vocab_size)[1],), -1, dtype=torch.int32)
    for token, text in enumerate(decoded_vocab[:vocab_size]):
        if len(text) == 1 and text[0] < 0x20 and text not in (b"\t", b"\n", b"\r"):
            words[token // 32] &= ~(1 << (token % 32))
    return words


class Matcher:
    """One sequence's place in its grammar."""

    def __init__(self, matcher, allowed: torch.Tensor):
        self.matcher, self.allowed = matcher, allowed

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)
        bitmask[row] &= self.allowed

    def accept(self, token: int) -> None:
        if not self.matcher.accept_token(token):
            raise GrammarError(f"token {token} is not allowed by the request's grammar")


def apply_masks(seqs: list, logits: torch.Tensor) -> None:
    """Mask, in place, each constrained sequence's row of ``logits`` to the tokens its grammar allows next."""
    rows = [i for i, s in enumerate(seqs) if s.matcher is not None]
    if not rows:
        return
    import xgrammar as xgr

    bitmask = xgr.allocate_token_bitmask(len(seqs), logits.shape[-1])
    for i in rows:
        seqs[i].matcher.fill(bitmask, i)
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), indices=rows)


def accept(seq, token: int) -> None:
    """Advance the sequence's grammar past its sampled token."""
    if seq.matcher is not None:
        seq.matcher.accept(token)
