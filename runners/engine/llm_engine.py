"""The step loop: schedule, run, postprocess (``LLMEngine.step``), after nano-vllm's ``llm_engine``; an
``AsyncLLMEngine`` (``async_engine.py``) drives it on a thread of its own for asyncio callers."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch

from runners.engine.adapter_files import Adapter
from runners.engine.errors import AdapterError, RequestError
from runners.engine.model_runner import ModelRunner
from runners.engine.sampler import Sampler, logprobs, sample
from runners.engine.scheduler import Scheduler
from runners.engine.sequence import SamplingParams, Sequence, TokenEvent
from runners.engine.structured import GrammarError, Grammars

logger = logging.getLogger("bentochat.engine")


def leave_cores_to_the_engine() -> None:
    """Run this thread's torch operations on one thread, so that the engine's thread is the one that
    starts an OpenMP team (on the CPU). libgomp, torch's OpenMP runtime, keeps a team of worker threads
    for every thread that has run a parallel region, and once a process has more of them than cores,
    a worker waits only 100 spins (instead of 300,000) before it sleeps: every parallel region of a
    step then waits for a sleeping worker to wake. Measured on 2 cores: after the loading thread had
    run one parallel region, a decode step at batch 1 took 2x as long on the engine's thread."""
    torch.set_num_threads(1)


def ending(prefills: list[tuple[Sequence, int]]) -> list[Sequence]:
    """The sequences of ``prefills`` whose prompt is all in once their ``n`` tokens are: those that give a token."""
    return [seq for seq, n in prefills if seq.num_cached + n == seq.num_tokens]


class LLMEngine:
    def __init__(self, model_runner: ModelRunner, *, max_model_len: int, max_num_seqs: int = 64,
                 max_prefill_tokens: int = 512, prefix_cache_tokens: int = 0, tokenizer=None,
                 threads: int | None = None, fair: bool = True):
        self.model_runner = model_runner
        # On the CPU: torch threads, set before each step on the thread that runs it (torch's thread count
        # is that thread's own); None leaves it as it is.
        self.threads = threads
        # Constrained decoding needs the tokenizer's vocabulary; without one, a grammar is refused.
        self.grammars = Grammars(tokenizer, model_runner.vocab_size) if tokenizer is not None else None
        pool = model_runner.pool  # the paged cache's blocks (the native forward pass), else None
        if pool is not None and pool.capacity < max_model_len:
            logger.warning("the KV cache holds %d tokens, less than the context of %d: requests are cut there "
                           "(raise kv_cache_memory)", pool.capacity, max_model_len)
            max_model_len = pool.capacity
        # Prefixes are reused by copying KV into a batch row (or sharing blocks): for batched cache forms only.
        # fair: tenants share the batch by weight (scheduler.py); False: first come, first served (benchmarks)
        self.scheduler = Scheduler(max_num_seqs, max_model_len, max_prefill_tokens,
                                   prefix_cache_tokens if model_runner.batched else 0, can_start=self._can_start,
                                   pool=pool, fair=fair)
        self.adapters = model_runner.adapters
        self.tokens_generated = 0
        self.prompt_tokens = 0  # of the prompts prefilled
        self.adapter_tokens: dict[str, int] = {}  # tokens generated per adapter name
        self._slots_contended = False  # in this step's scheduling, a sequence waits for an adapter slot

    def stats(self) -> dict[str, int]:
        """Sequences running and waiting now; totals since start; bytes of keys and values held now
        (running batch and prefix cache) and, on the paged cache, the most it may hold."""
        cache = self.scheduler.prefix_cache
        pool = self.scheduler.pool
        return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "tokens_generated": self.tokens_generated, "prompt_tokens": self.prompt_tokens,
                "prefix_cache_hit_tokens": cache.hits if cache else 0,
                "grammars_compiled": self.grammars.compiled_count if self.grammars else 0,
                "grammar_cache_bytes": self.grammars.cached_bytes if self.grammars else 0,
                "kv_cache_bytes": self.model_runner.kv_bytes() + (cache.num_bytes if cache and not pool else 0),
                "kv_cache_capacity_bytes": pool.num_blocks * pool.block_bytes if pool else None,
                "preemptions": self.scheduler.preemptions,
                "adapters": self.adapter_stats(), "adapter_loads": self.adapters.loads,
                "adapter_evictions": self.adapters.evictions}

    def adapter_stats(self) -> dict[str, dict]:
        """Per loaded adapter: where it comes from, whether it holds a slot, its sequences running and
        waiting, and the tokens generated on it."""
        counts = {name: {**adapter.describe(), "resident": adapter in self.adapters.resident, "running": 0,
                         "waiting": 0, "tokens_generated": self.adapter_tokens.get(name, 0)}
                  for name, adapter in list(self.adapters.known.items())}
        for state, seqs in (("running", list(self.scheduler.running)), ("waiting", list(self.scheduler.waiting))):
            for seq in seqs:
                if seq.adapter is not None and seq.adapter.name in counts:
                    counts[seq.adapter.name][state] += 1
        return counts

    def add_adapter(self, adapter: Adapter) -> None:
        """Serve ``adapter`` (read and checked by ``adapters.read``) under its name; its weights take a
        slot when a request first needs them."""
        self.adapters.add(adapter)
        self.adapter_tokens.pop(adapter.name, None)

    def remove_adapter(self, name: str) -> None:
        """Stop serving adapter ``name``: new requests for it are refused, those already queued or
        running finish on it, and its slot is freed after them."""
        adapter = self.adapters.remove(name)
        if self.scheduler.prefix_cache is not None:
            self.scheduler.prefix_cache.forget(adapter)

    def _busy(self) -> set[Adapter]:
        """The adapters of the sequences that run or have started (they keep their slots)."""
        return {s.adapter for s in (*self.scheduler.running, *self.scheduler.waiting)
                if s.adapter is not None and s.holds_slot}

    def _can_start(self, seq: Sequence) -> bool:
        """Whether a waiting sequence may start: it has its adapter's slot, or gets one now. Once one
        waits for a slot, later sequences on adapters wait behind it (first come, first served), so
        that the adapters in the slots fall idle and one can be evicted for it."""
        if seq.adapter is None or seq.holds_slot:
            return True
        if not self._slots_contended:
            seq.holds_slot = self.adapters.slot(seq.adapter, self._busy()) is not None
            self._slots_contended = not seq.holds_slot
        return seq.holds_slot

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def check(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None = None,
              weight: float = 1.0) -> None:
        """Raise :class:`RequestError` for a request the engine cannot run."""
        vocab = self.model_runner.vocab_size
        if not (math.isfinite(weight) and weight > 0):
            raise RequestError("weight: a tenant's weight must be a positive number")
        if adapter is not None and adapter not in self.adapters.known:
            raise RequestError(f"model: no adapter named {adapter!r} is loaded")
        if not prompt_ids:
            raise RequestError("prompt: must hold at least one token")
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise RequestError(f"prompt: token ids must be in [0, {vocab})")
        if len(prompt_ids) >= self.scheduler.max_model_len:
            raise RequestError(f"prompt: {len(prompt_ids)} tokens leave no room in the context of "
                               f"{self.scheduler.max_model_len}")
        try:
            params.check(vocab)
        except ValueError as e:
            raise RequestError(str(e)) from e
        if params.grammar is not None and self.grammars is None:
            raise RequestError("grammar: this engine has no tokenizer to constrain its output with")

    def compile(self, seq: Sequence) -> None:
        """Compile the sequence's grammar, if it has one and it is not compiled yet (from the cache
        when the same grammar came before); raises :class:`RequestError` for one that does not."""
        if seq.params.grammar is not None and seq.grammar is None:
            try:
                seq.grammar = self.grammars.compile(seq.params.grammar)
            except GrammarError as e:
                raise RequestError(str(e)) from e

    def add(self, seq: Sequence) -> None:
        """Queue a sequence; raises :class:`RequestError` (and queues nothing) for one it cannot run."""
        self.check(seq.prompt_ids, seq.params, seq.adapter_name, seq.weight)
        self.admit(seq)

    def admit(self, seq: Sequence) -> None:
        """Queue a sequence that passed :meth:`check`: give it its adapter, sampler and grammar matcher."""
        if seq.adapter_name is not None:
            try:
                seq.adapter = self.adapters.get(seq.adapter_name)
            except AdapterError as e:  # unloaded since it was checked
                raise RequestError(str(e)) from e
        self.compile(seq)
        try:
            seq.sampler = Sampler(seq.params)
            if seq.grammar is not None:
                seq.matcher = self.grammars.matcher(seq.grammar, seq.params.stop_token_ids)
        except Exception as e:
            raise RequestError(f"invalid sampling parameters: {e}") from e
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> Sequence | None:
        return self.scheduler.abort(request_id)

    def fail_all(self) -> list[Sequence]:
        """End every sequence (a step that failed as a whole, a dead thread); returns them."""
        self.model_runner.reset()
        return self.scheduler.drain()

    def step(self, emit: Callable[[list[tuple[Sequence, TokenEvent | Exception]]], None] | None = None
             ) -> list[tuple[Sequence, TokenEvent | Exception]]:
        """A bounded amount of prefill for waiting requests, then one decode step for the running batch.

        Returns each sequence that produced a token, with it; a sequence whose forward pass failed
        leaves the engine with its error (all of the batch when the batched decode fails). ``emit``,
        if given, gets each phase's results as soon as they are ready: new requests' first tokens
        need not wait for the decode step. On the native forward pass the step is one phase, one pass
        (:meth:`_run`), after a pass of its own for a tenant served less (:meth:`_first_tenant`).
        """
        if self.adapters.resident:
            self.adapters.free_unknown(self._busy())  # the slots of unloaded adapters nobody uses any more
        self._slots_contended = False
        prefills, decodes = self.scheduler.schedule()
        if self.threads is not None and (prefills or decodes):
            torch.set_num_threads(self.threads)
        for seq, _ in prefills:
            if seq.cached_prompt_tokens is None:  # its first prefill: what it has cached, the prefix cache gave
                seq.cached_prompt_tokens = seq.num_cached
        if self.model_runner.native:  # the whole step in one pass, but for a tenant served less (below)
            first, prefills = self._first_tenant(prefills)
            results = self._prefill(first, emit) if first else []
            done = self._run(prefills, decodes)
            if emit and done:
                emit(done)
            return results + done
        results = self._prefill(prefills, emit)
        if decodes:
            try:
                decoded = self._finish(decodes, self.model_runner.decode(decodes))
            except Exception as e:
                logger.exception("decode step of %d sequences failed", len(decodes))
                self.model_runner.reset()
                decoded = self._fail(decodes, e)
            if emit:
                emit(decoded)
            results += decoded
        if not self.scheduler.running:
            self.model_runner.reset()  # free the batch cache as soon as nothing is running
        return results

    def _run(self, prefills: list[tuple[Sequence, int]], decodes: list[Sequence]
             ) -> list[tuple[Sequence, TokenEvent | Exception]]:
        """The native forward pass's step: the running sequences' next tokens and the prompts' chunks in
        one pass (``ModelRunner.run``), which reads the weights once for all of them: a long prompt's chunk
        delays the running batch's token by its own work only, and the prompts that end in this step give
        their first token with it. A pass that fails fails every sequence in it."""
        if not (prefills or decodes):
            return []
        last = ending(prefills)
        try:
            logits = self.model_runner.run(decodes, prefills)
            self.prompt_tokens += sum(seq.num_prompt_tokens for seq in last if not seq.output_ids)
            results = self._finish([*decodes, *last], logits) if decodes or last else []
        except Exception as e:
            logger.exception("forward pass of %d sequences failed", len(decodes) + len(prefills))
            results = self._fail([*decodes, *(seq for seq, _ in prefills)], e)
        if not self.scheduler.running:
            self.model_runner.reset()
        return results

    def _first_tenant(self, prefills: list[tuple[Sequence, int]]
                      ) -> tuple[list[tuple[Sequence, int]], list[tuple[Sequence, int]]]:
        """Where the prompts that end this step are of several tenants (fair sharing), the first tenant's
        (``Scheduler.passes``: the one served least), taken out of ``prefills``, for a pass of their own
        before the rest of the step, so that its first tokens wait neither for the others' prompts nor
        the running batch; else none (a second pass reads the weights again)."""
        last = ending(prefills)
        groups = self.scheduler.passes(last)
        if len(groups) < 2:
            return [], prefills
        first = set(map(id, groups[0]))
        return [p for p in prefills if id(p[0]) in first], [p for p in prefills if id(p[0]) not in first]

    def _prefill(self, prefills: list[tuple[Sequence, int]], emit: Callable | None = None
                 ) -> list[tuple[Sequence, TokenEvent | Exception]]:
        """Prompts that end this step are prefilled together, in one forward pass per tenant
        (``Scheduler.passes``: the tenant served least first, whose first tokens are out before the
        others' prompts are computed), the first chunks of longer ones alone; only the former produce a
        token. ``emit`` gets each pass's tokens as soon as they are sampled."""
        last = ending(prefills)
        if not self.model_runner.batched:
            last = []
        results = []
        for group in self.scheduler.passes(last):
            try:
                logits = self.model_runner.prefill_together(group)
            except Exception as e:
                logger.exception("prefill of %d requests failed", len(group))
                done = self._fail(group, e)
            else:
                self.prompt_tokens += sum(seq.num_prompt_tokens for seq in group if not seq.output_ids)
                done = self._finish(group, logits)
            if emit:
                emit(done)
            results += done
        seqs, logits, failed = [], [], []
        for seq, n in prefills:
            if seq in last:
                continue
            try:
                out = self.model_runner.prefill(seq, n)
            except Exception as e:
                logger.exception("prefill of request %s failed", seq.request_id)
                failed += self._fail([seq], e)
                continue
            if out is not None:
                logits.append(out.unsqueeze(0))
                seqs.append(seq)
        self.prompt_tokens += sum(seq.num_prompt_tokens for seq in seqs if not seq.output_ids)
        done = (self._finish(seqs, torch.cat(logits)) if seqs else []) + failed
        if emit and done:
            emit(done)
        return results + done

    def _fail(self, seqs: list[Sequence], error: Exception) -> list[tuple[Sequence, Exception]]:
        for seq in seqs:
            self.scheduler.abort(seq.request_id)
        return [(seq, error) for seq in seqs]

    def _finish(self, seqs: list[Sequence], logits: torch.Tensor) -> list[tuple[Sequence, TokenEvent | Exception]]:
        """Sample each sequence's next token from its row of ``logits`` and append it. A sequence
        whose sampling fails leaves the engine with its error; the others go on."""
        tokens = sample(seqs, logits)
        failed = [(seq, t) for seq, t in zip(seqs, tokens) if isinstance(t, Exception)]
        for seq, error in failed:
            logger.warning("sampling for request %s failed: %r", seq.request_id, error)
            self._fail([seq], error)
        if failed:
            keep = [i for i, t in enumerate(tokens) if not isinstance(t, Exception)]
            seqs, tokens, logits = [seqs[i] for i in keep], [tokens[i] for i in keep], logits[keep]
        outputs = [TokenEvent(t) for t in tokens]
        wants = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        if wants:
            found = logprobs(logits[wants], [tokens[i] for i in wants], [seqs[i].params.logprobs for i in wants])
            for i, (lp, top) in zip(wants, found):
                outputs[i].logprob, outputs[i].top_logprobs = lp, top
        self.scheduler.postprocess(seqs, tokens)
        for seq, out in zip(seqs, outputs):
            out.finish_reason = seq.finish_reason
            if seq.num_output_tokens == 1:
                out.cached_tokens = seq.cached_prompt_tokens
        self.tokens_generated += len(tokens)
        for seq in seqs:
            if seq.adapter is not None:
                self.adapter_tokens[seq.adapter.name] = self.adapter_tokens.get(seq.adapter.name, 0) + 1
        return list(zip(seqs, outputs)) + failed

    def generate(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None = None) -> list[int]:
        """Run one request to completion in the calling thread (tests, benchmarks)."""
        return self.generate_batch([prompt_ids], [params], [adapter])[0]

    def generate_batch(self, prompts: list[list[int]], params: list[SamplingParams],
                       adapters: list[str | None] | None = None) -> list[list[int]]:
        """Run requests together to completion in the calling thread (tests, benchmarks)."""
        adapters = adapters or [None] * len(prompts)
        seqs = [Sequence(f"generate-{i}", p, sp, adapter_name=a)
                for i, (p, sp, a) in enumerate(zip(prompts, params, adapters))]
        for seq in seqs:
            self.add(seq)
        while any(seq.finish_reason is None for seq in seqs):
            self.step()
        return [seq.output_ids for seq in seqs]
