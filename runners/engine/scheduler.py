"""Which sequences take part in the next step: every running sequence decodes one token, and waiting
sequences are prefilled within a per-step token budget, so a long prompt never stalls the batch."""

from __future__ import annotations

from collections import deque

from runners.engine.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, max_num_seqs: int, max_model_len: int, max_prefill_tokens: int = 512):
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()  # in arrival order; only the first may be partly prefilled
        self.running: list[Sequence] = []  # in the order they joined the batch

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> tuple[list[tuple[Sequence, int]], list[Sequence]]:
        """``(prefills, decodes)``: how many prompt tokens to prefill for which waiting sequences (at
        most ``max_prefill_tokens`` in all, a longer prompt is split over steps), and the running
        sequences, each of which decodes one token."""
        prefills, budget = [], self.max_prefill_tokens
        for seq in list(self.waiting)[: self.max_num_seqs - len(self.running)]:
            if budget <= 0:
                break
            n = min(seq.num_prompt_tokens - seq.num_cached, budget)
            if n > 0:  # (the engine admits no empty prompt; should one be here, it holds up no one)
                prefills.append((seq, n))
                budget -= n
        return prefills, list(self.running)

    def postprocess(self, seqs: list[Sequence], tokens: list[int]) -> None:
        """Append each sampled token; a sequence whose prompt was just prefilled joins the running
        batch, one that is done finishes."""
        for seq, token in zip(seqs, tokens):
            seq.output_ids.append(token)
            if token in seq.params.stop_token_ids:  # the sampler kept them out before min_tokens
                seq.finish("stop")
            elif seq.num_output_tokens >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len:
                seq.finish("length")
            if seq.status is SequenceStatus.WAITING:
                self.waiting.remove(seq)
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
            elif seq.status is SequenceStatus.FINISHED and seq in self.waiting:
                self.waiting.remove(seq)
        self.running = [s for s in self.running if s.status is SequenceStatus.RUNNING]

    def abort(self, request_id: str) -> Sequence | None:
        for queue in (self.waiting, self.running):
            for seq in list(queue):
                if seq.request_id == request_id:
                    queue.remove(seq)
                    seq.finish("abort")
                    return seq
        return None
