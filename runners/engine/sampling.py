"""Per-request sampling parameters, and sampling as a function of logits and those parameters."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


# Temperatures below this sample greedily (vLLM's epsilon): dividing logits by less would overflow.
SAMPLING_EPS = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k cut
    repetition_penalty: float = 1.0  # HF/CTRL style, over prompt and output
    presence_penalty: float = 0.0  # OpenAI style, over output only
    frequency_penalty: float = 0.0
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    seed: int | None = None
    logprobs: int | None = None  # None: none; k: the chosen token's log-probability and the k most likely

    @classmethod
    def from_dict(cls, d: dict) -> SamplingParams:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known and v is not None}
        if "stop_token_ids" in values:
            values["stop_token_ids"] = tuple(values["stop_token_ids"])
        return cls(**values)

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS or self.top_k == 1

    def check(self, vocab_size: int) -> None:
        """Raise ValueError, naming the parameter, for values the sampler cannot work with. The API
        refuses these with a 400 first; this keeps the engine safe from any other caller."""
        for name in ("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name}: must be a finite number")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.repetition_penalty <= 0:
            raise ValueError("temperature, top_p or repetition_penalty: out of range")
        if self.max_tokens < 1 or self.min_tokens < 0 or self.top_k < 0:
            raise ValueError("max_tokens, min_tokens or top_k: out of range")
        if any(not 0 <= t < vocab_size for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids: token ids must be in [0, {vocab_size})")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError("logprobs: must be in [0, 20]")


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
    exception in its row instead of a token, so that only its own sequence fails."""
    tokens: list[int | Exception | None] = [None] * len(seqs)
    plain = [i for i, s in enumerate(seqs) if s.sampler.is_plain_greedy(len(s.output_ids))]
    if plain:
        for i, token in zip(plain, logits[plain].argmax(dim=-1).tolist()):
            tokens[i] = token
    for i, seq in enumerate(seqs):
        if tokens[i] is None:
            try:
                tokens[i] = seq.sampler(logits[i], seq.prompt_ids, seq.output_ids)
            except Exception as e:  # e.g. probabilities that are not finite
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
