"""Waiting and running queues: which sequences take part in the next step."""

from __future__ import annotations

from collections import deque

from runners.engine.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, max_num_seqs: int, max_model_len: int):
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> list[Sequence]:
        """Admit waiting sequences while there is room; every running sequence takes the next step."""
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
        return list(self.running)

    def postprocess(self, seqs: list[Sequence], tokens: list[int]) -> list[Sequence]:
        """Append each sampled token, finish sequences that are done, return those that finished."""
        finished = []
        for seq, token in zip(seqs, tokens):
            seq.output_ids.append(token)
            if token in seq.params.stop_token_ids:  # the sampler kept them out before min_tokens
                seq.finish("stop")
            elif seq.num_output_tokens >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len:
                seq.finish("length")
            if seq.status is SequenceStatus.FINISHED:
                finished.append(seq)
        self.running = [s for s in self.running if s.status is not SequenceStatus.FINISHED]
        return finished

    def abort(self, request_id: str) -> Sequence | None:
        for queue in (self.waiting, self.running):
            for seq in list(queue):
                if seq.request_id == request_id:
                    queue.remove(seq)
                    seq.finish("abort")
                    return seq
        return None
