"""Sampling: one sequence's next token from its row of the logits, with its own parameters
(``sequence.SamplingParams``), masked first by its grammar where it has one (``structured.py``); and the
model's log-probabilities of the chosen tokens."""

from __future__ import annotations

import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from runners.engine.sequence import SamplingParams
from runners.engine.structured import GrammarError, accept, apply_masks


class Sampler:
    """Turns one sequence's next-token logits into a token id, with that sequence's own parameters.

    Repetition penalty, temperature, top-k and top-p are transformers' own logits processors, so a
    greedy request matches ``model.generate`` token for token. OpenAI's presence and frequency
    penalties and ``min_tokens`` have no transformers counterpart and are applied here.
    """

    def __init__(self, params: SamplingParams):
        self.params = params
        penalties = []
        if params.repetition_penalty != 1.0:
            penalties.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
        self.penalties = LogitsProcessorList(penalties)
        warpers = []
        if not params.greedy:
            if params.temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k > 0:
                warpers.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                warpers.append(TopPLogitsWarper(params.top_p))
        self.warpers = LogitsProcessorList(warpers)
        self.generator = None
        if not params.greedy:
            self.generator = torch.Generator()
            if params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(params.seed % 2**64)  # any integer; torch takes 64 bits

    def is_plain_greedy(self, num_output_tokens: int) -> bool:
        """Whether the token is simply the argmax of the logits (batched by the engine)."""
        p = self.params
        return (p.greedy and not self.penalties and not p.presence_penalty and not p.frequency_penalty
                and not (num_output_tokens < p.min_tokens and p.stop_token_ids))

    def __call__(self, logits: torch.Tensor, prompt_ids: list[int], output_ids: list[int]) -> int:
        p = self.params
        scores = logits.float().reshape(1, -1).cpu().clone()  # a normal tensor, safe to edit in place
        history = torch.tensor([prompt_ids + output_ids]) if self.penalties or self.warpers else None
        if self.penalties:
            scores = self.penalties(history, scores)
        if output_ids and (p.presence_penalty or p.frequency_penalty):
            counts = torch.bincount(torch.tensor(output_ids), minlength=scores.shape[-1])[: scores.shape[-1]]
            scores = scores - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()
        if len(output_ids) < p.min_tokens and p.stop_token_ids:
            scores[0, list(p.stop_token_ids)] = float("-inf")
        if p.greedy:
            return int(scores.argmax(dim=-1))
        probs = torch.softmax(self.warpers(history, scores), dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def sample(seqs: list, logits: torch.Tensor) -> list[int | Exception]:
    """The next token of every sequence, row i of ``logits`` for ``seqs[i]``, each with its own sampler.
    Rows that only need an argmax are done in one batched call. A sampler that fails gives its
    exception in its row instead of a token, so that only its own sequence fails. A constrained
    sequence samples from the tokens its grammar allows (its row is masked in place)."""
    apply_masks(seqs, logits)
    tokens: list[int | Exception | None] = [None] * len(seqs)
    plain = [i for i, s in enumerate(seqs) if s.sampler.is_plain_greedy(len(s.output_ids))]
    if plain:  # (every row: no copy of the logits)
        greedy = (logits if len(plain) == len(seqs) else logits[plain]).argmax(dim=-1).tolist()
        for i, token in zip(plain, greedy):
            tokens[i] = token
    for i, seq in enumerate(seqs):
        if tokens[i] is None:
            try:
                tokens[i] = seq.sampler(logits[i], seq.prompt_ids, seq.output_ids)
            except Exception as e:  # e.g. probabilities that are not finite
                tokens[i] = e
        if not isinstance(tokens[i], Exception):
            try:
                accept(seq, tokens[i])
            except GrammarError as e:
                tokens[i] = e
    return tokens


def logprobs(logits: torch.Tensor, tokens: list[int], top: list[int]) -> list[tuple[float, list[tuple[int, float]]]]:
    """The model's log-probability of each chosen token and its ``top[i]`` most likely alternatives.

    These are the model's own distribution (before penalties and temperature), as OpenAI reports them.
    """
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, torch.tensor(tokens, device=lp.device).unsqueeze(1)).squeeze(1).tolist()
    k = max(top)
    values, ids = (lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long()))
    values, ids = values.tolist(), ids.tolist()
    return [(c, list(zip(ids[i][:top[i]], values[i][:top[i]]))) for i, c in enumerate(chosen)]
