"""What the engine raises to its callers, torch-free: the runner service catches these without loading
torch where it is only declared (the gateway's process), and the importer reports adapter errors."""

from __future__ import annotations


class RequestError(ValueError):
    """The request cannot run: an empty prompt, token ids outside the vocabulary, bad parameters."""


class EngineError(RuntimeError):
    """The engine failed this request (its forward pass or sampling raised), or the engine is dead."""


class QueueFull(RuntimeError):
    """The engine has ``max_num_seqs`` running and ``max_queue`` waiting; retry after ``retry_after`` s."""

    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry after {retry_after} s")
        self.retry_after = retry_after


class AdapterError(ValueError):
    """An adapter that cannot be served on this model; the message says why."""


class AdapterMismatch(AdapterError):
    """An adapter whose layers this model does not have, or has in other shapes."""
