"""Fair sharing in the engine (``runners/engine/scheduler.py``): tenant A floods (64 streams by default,
eight times its equal share of a 16-slot batch), tenant B sends 4 streams; each stream sends its next
request as soon as the last ends (closed loop), ``--max-tokens`` greedy tokens a request (every answer
full length). Five variants, alternated in each of ``--rounds`` rounds so that the machine's drift hits
them all: B alone; A floods and B asks, with fair sharing and first come, first served; A alone, the same
two ways. It prints B's time to first token (p50 and p99 of every round's requests together), the
tokens/s of each tenant and of the box (median of the rounds, and their range), the length of an engine
step (in-process: what a request arriving during one waits at most before it can start), the load
average while each variant ran, and the ratios the fairness goal is stated in. Timings only: it
asserts nothing.

In-process (the default), on a fresh ``LLMEngine`` per run over one loaded model, stepped in this
thread: a request arrives between two steps, and its first token is timed when the engine emits it
(after its prefill pass, before the step's decode, as the runner streams it); B's TTFT is also counted
in engine steps, which no other load on the machine changes. First come, first served is
``LLMEngine(fair=False)``.

``--served``: through a real gateway, ``bentoml serve`` with three tenants: ``A`` and ``B`` (weight 1
each) and ``fifo``, which holds a second key of each: A's and B's streams on the fifo keys are one
tenant, first come, first served within it, which is the comparison. Each stream is an ``openai``
client streaming chat completions with its tenant's key; a token is a streamed chunk with content. Each
tenant's streams run in a process of their own, as they would on their own machines: B's client reads
its first token without waiting behind the parsing of A's flood. ``--flood-nice 19`` runs A's process
at that niceness, so that its parsing yields the shared cores to the servers and to B.

    .venv/bin/python bench/fairness.py --rounds 3 --steps 300      # in-process
    .venv/bin/python bench/fairness.py --served --rounds 3 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from load import PROMPTS, pct, prompt_ids  # noqa: E402

# (name, fair, A streams?, B streams?), in the order each round runs them
VARIANTS = [("B alone", True, False, True), ("A floods + B, fair", True, True, True),
            ("A floods + B, FCFS", False, True, True), ("A alone, fair", True, True, False),
            ("A alone, FCFS", False, True, False)]


class Tenant:
    def __init__(self, name: str, streams: int):
        self.name, self.streams = name, streams
        self.ttft: list[float] = []  # seconds from arrival to the first token
        self.ttft_steps: list[int] = []  # engine steps, the same (in-process)
        self.tokens = 0
        self.unanswered = 0  # requests still without a first token at the end


def run_engine(engine, tenants: list[Tenant], prompts: list[list[int]], params, seconds: float,
               max_steps: int = 0) -> tuple[float, list[float]]:
    """Closed-loop streams on ``engine`` for ``seconds`` (or ``max_steps`` steps), driven in this thread (a
    request arrives between two steps, when its stream's last one ended); returns the seconds it ran and
    the seconds of each step."""
    from runners.engine import Sequence

    steps, arrived, sent, ended = 0, {}, {}, []

    def send(tenant: Tenant, k: int) -> None:
        i = sent[tenant.name, k] = sent.get((tenant.name, k), -1) + 1
        seq = Sequence(f"{tenant.name}-{k}-{i}", prompts[(k + i) % len(prompts)], params, tenant=tenant.name)
        arrived[seq.request_id] = (time.perf_counter(), steps, tenant, k)
        engine.add(seq)

    def emit(results) -> None:  # each prefill pass's tokens, then the decode's, as the runner streams them
        now = time.perf_counter()
        for seq, event in results:
            if isinstance(event, Exception):
                raise event
            t0, step0, tenant, k = arrived[seq.request_id]
            tenant.tokens += 1
            if seq.num_output_tokens == 1:
                tenant.ttft.append(now - t0)
                tenant.ttft_steps.append(steps + 1 - step0)
            if seq.finish_reason is not None:
                ended.append((tenant, k))

    for tenant in tenants:
        for k in range(tenant.streams):
            send(tenant, k)
    start = last = time.perf_counter()
    lengths = []
    while steps < max_steps if max_steps else last - start < seconds:
        engine.step(emit)
        steps += 1
        lengths.append(time.perf_counter() - last)
        last += lengths[-1]
        while ended:
            send(*ended.pop())
    elapsed = time.perf_counter() - start
    for seq in [*engine.scheduler.waiting, *engine.scheduler.running]:
        arrived[seq.request_id][2].unanswered += not seq.output_ids
    return elapsed, lengths


def in_process(args):
    """A function running one variant in-process: ``(fair, tenants) -> seconds``."""
    import bentoml
    from transformers import AutoTokenizer

    from runners.engine import LLMEngine, ModelRunner, SamplingParams
    from runners.engine.loader import load_causal_lm

    path = bentoml.models.get(args.model).path
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = [prompt_ids(tokenizer, p) for p in PROMPTS]
    model = load_causal_lm(path, dtype="bfloat16", forward="lean")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0)  # no stop token: every answer is full length

    def engine(fair: bool):
        return LLMEngine(ModelRunner(model, kv_cache_memory=1 << 30), max_num_seqs=args.slots, max_model_len=2048,
                         prefix_cache_tokens=2048, threads=args.threads or len(os.sched_getaffinity(0)), fair=fair)

    def run(fair: bool, tenants: list[Tenant], seconds: float = args.seconds, steps: int = args.steps):
        warm = engine(fair)  # its prefix cache holds the prompts, as on a server that ran a while
        warm.generate_batch(prompts, [SamplingParams(max_tokens=1)] * len(prompts))
        return run_engine(warm, tenants, prompts, params, seconds, steps)

    run(True, [Tenant("warm", args.slots)], 5.0, min(args.steps, 20))
    return run, f"in-process, {args.threads or 'all'} torch threads, " + \
        (f"{args.steps} steps a run" if args.steps else f"{args.seconds:.0f} s a run")


async def drive_served(url: str, keys: dict[str, str], tenants: list[Tenant], max_tokens: int, seconds: float) -> float:
    """Closed-loop streams of each tenant with its key for ``seconds``; what is under way then is
    cancelled (the server aborts it). Returns the seconds it ran."""
    from openai import AsyncOpenAI

    clients = {t.name: AsyncOpenAI(base_url=f"{url}/v1", api_key=keys[t.name], max_retries=0) for t in tenants}

    async def stream(tenant: Tenant, k: int) -> None:
        for i in range(1 << 30):
            start, first = time.perf_counter(), True
            tenant.unanswered += 1
            async with await clients[tenant.name].chat.completions.create(
                    model="bench", messages=[{"role": "user", "content": PROMPTS[(k + i) % len(PROMPTS)]}],
                    max_tokens=max_tokens, temperature=0, stream=True, extra_body={"min_tokens": max_tokens}) as chunks:
                async for chunk in chunks:
                    if chunk.choices and chunk.choices[0].delta.content:
                        tenant.tokens += 1
                        if first:
                            tenant.ttft.append(time.perf_counter() - start)
                            tenant.unanswered -= 1
                            first = False

    tasks = [asyncio.create_task(stream(t, k)) for t in tenants for k in range(t.streams)]
    start = time.perf_counter()
    done, _ = await asyncio.wait(tasks, timeout=seconds)
    elapsed = time.perf_counter() - start
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for task in done:  # a stream that ended before time: an error
        task.result()
    for client in clients.values():
        await client.close()
    await asyncio.sleep(1.0)  # the aborted requests leave the engine
    return elapsed



def tenant_process(url: str, key: str, name: str, streams: int, max_tokens: int, seconds: float, start, conn,
                   nice: int = 0) -> None:
    """One tenant's streams in a process of its own (``drive_served``), at ``nice``, begun when ``start`` (a
    barrier) lets every tenant go; sends back ``(seconds, ttft, tokens, unanswered)``."""
    os.nice(nice)
    tenant = Tenant(name, streams)

    async def go() -> float:
        start.wait()
        return await drive_served(url, {name: key}, [tenant], max_tokens, seconds)

    try:
        conn.send((asyncio.run(go()), tenant.ttft, tenant.tokens, tenant.unanswered))
    except BaseException as e:
        conn.send(e)
        raise


def drive_apart(server, url: str, keys: dict[str, str], tenants: list[Tenant], max_tokens: int, seconds: float,
                flood_nice: int = 0) -> float:
    """``drive_served`` with each tenant in a process of its own (A's at ``flood_nice``); fills ``tenants`` in;
    the seconds run."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    start = context.Barrier(len(tenants) + 1)
    pipes, children = [], []
    for tenant in tenants:
        mine, theirs = context.Pipe(duplex=False)
        child = context.Process(target=tenant_process, daemon=True, args=(
            url, keys[tenant.name], tenant.name, tenant.streams, max_tokens, seconds, start, theirs,
            flood_nice if tenant.name == "A" else 0))
        child.start()
        pipes.append(mine)
        children.append(child)
    start.wait(timeout=120)
    elapsed = 0.0
    for tenant, pipe, child in zip(tenants, pipes, children):
        while not pipe.poll(0.5):
            if not server.alive():
                raise server.failure(None, "during the load")
            if not child.is_alive():
                raise RuntimeError(f"tenant {tenant.name}'s clients exited with {child.exitcode}")
        got = pipe.recv()
        if isinstance(got, BaseException):
            raise got
        seconds_run, tenant.ttft, tenant.tokens, tenant.unanswered = got
        elapsed = max(elapsed, seconds_run)
        child.join()
    return elapsed


def served(args, workdir: Path):
    """Start ``bentoml serve`` with tenants A, B and fifo; a function running one variant through it."""
    from servers import Server

    keys = {name: f"sk-bench-{name}-{os.urandom(8).hex()}" for name in ("A", "B", "fifo-A", "fifo-B")}
    config = workdir / "bentochat.yaml"
    config.write_text(
        f"models:\n  - {{id: bench, model: {args.model}, kind: chat, dtype: bfloat16, max_concurrency: {args.slots}, "
        f"max_queue: 256, prefix_cache_tokens: 2048" + (f", cpu_threads: {args.threads}" if args.threads else "") + "}\n"
        f"tenants:\n  - {{name: A, keys: [{keys['A']}]}}\n  - {{name: B, keys: [{keys['B']}]}}\n"
        f"  - {{name: fifo, keys: [{keys['fifo-A']}, {keys['fifo-B']}]}}\n"
        f"usage: {{ledger_dir: {workdir / 'usage'}}}\n")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = Server("bentochat", [str(Path(sys.executable).parent / "bentoml"), "serve", "service:BentoChat",
                                  "--host", "127.0.0.1", "--port", str(port)],
                    f"http://127.0.0.1:{port}/readyz", workdir / "bentochat.log", cwd=ROOT,
                    env={"BENTOCHAT_CONFIG": str(config)})
    server.start()
    url = f"http://127.0.0.1:{port}"

    def run(fair: bool, tenants: list[Tenant], seconds: float = args.seconds):
        names = {t.name: keys[t.name if fair else f"fifo-{t.name}"] for t in tenants}
        return drive_apart(server, url, names, tenants, args.max_tokens, seconds, args.flood_nice), []

    run(False, [Tenant("A", len(PROMPTS))], 5.0)  # warm: every prompt, in the prefix cache
    return server, run, f"served (bentoml serve, openai streams), {args.threads or 'all'} torch threads, " \
        f"{args.seconds:.0f} s a run"


@dataclass
class Result:
    a: Tenant
    b: Tenant
    seconds: float
    load: float  # the 1-minute load average, before and after the run's mean
    steps: list[float]  # each engine step's seconds (in-process)

    def tps(self, which: str = "AB") -> float:
        return (self.a.tokens * ("A" in which) + self.b.tokens * ("B" in which)) / self.seconds


def report(results: dict[str, list[Result]], header: str) -> None:
    def ms(v):
        return f"{v * 1000:.0f}" if v is not None else "-"

    def tps(runs: list[Result], which: str) -> str:
        values = [r.tps(which) for r in runs]
        return f"{statistics.median(values):.1f} ({min(values):.0f}-{max(values):.0f})"

    def b(runs: list[Result], what: str) -> list:
        return [v for r in runs for v in getattr(r.b, what)]

    print(f"\n{header}\n")
    print(f"{'run':<20}{'B TTFT p50/p99 ms':>18}{'(steps)':>8}{'B n':>5}{'A tok/s':>18}{'B tok/s':>18}"
          f"{'total tok/s':>18}{'step p50/p99 ms':>16}{'load avg':>10}")
    for name, runs in results.items():
        ttft, steps = b(runs, "ttft"), pct(b(runs, "ttft_steps"), 0.99)
        lengths, loads = [v for r in runs for v in r.steps], [r.load for r in runs]
        print(f"{name:<20}{ms(pct(ttft, 0.5)) + ' / ' + ms(pct(ttft, 0.99)):>18}{steps if steps is not None else '-':>8}"
              f"{len(ttft):>5}{tps(runs, 'A'):>18}{tps(runs, 'B'):>18}{tps(runs, 'AB'):>18}"
              f"{ms(pct(lengths, 0.5)) + ' / ' + ms(pct(lengths, 0.99)):>16}{f'{min(loads):.1f}-{max(loads):.1f}':>10}")
    unanswered = {name: sum(r.b.unanswered for r in runs) for name, runs in results.items()}
    print(f"B's requests without a first token at the end of a run: {unanswered}")

    def p99(name: str, r: int | None = None) -> float | None:
        return pct(b(results[name] if r is None else results[name][r:r + 1], "ttft"), 0.99)

    def total(name: str) -> float:
        return statistics.median(r.tps() for r in results[name])

    flood, alone, fcfs = "A floods + B, fair", "B alone", "A floods + B, FCFS"
    each = ", ".join(f"{p99(flood, r) / p99(alone, r):.2f}x" for r in range(len(results[alone]))
                     if p99(alone, r) and p99(flood, r))
    if p99(alone) and p99(flood):
        print(f"B's TTFT p99 under the flood, fair / B alone: {p99(flood) / p99(alone):.2f}x (round by round: {each})"
              + (f"; first come, first served: {p99(fcfs) / p99(alone):.2f}x" if p99(fcfs) else ""))
    print(f"total tokens/s under the flood, fair / FCFS: {total(flood) / total(fcfs):.3f}x")
    print(f"A alone, fair / FCFS: {total('A alone, fair') / total('A alone, FCFS'):.3f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct:latest", help="BentoML store tag")
    parser.add_argument("--served", action="store_true", help="through bentoml serve instead of in-process")
    parser.add_argument("--slots", type=int, default=16, help="max_num_seqs: sequences generated together")
    parser.add_argument("--a-streams", type=int, default=64)
    parser.add_argument("--b-streams", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="each variant this many times, in turns")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each run")
    parser.add_argument("--steps", type=int, default=0, help="in-process: length of each run in engine steps instead")
    parser.add_argument("--threads", type=int, default=0, help="the engine's torch threads (cpu_threads when served); "
                        "default: every core")
    parser.add_argument("--flood-nice", type=int, default=0, help="served: A's clients at this niceness (19: "
                        "they yield the cores to the servers and B's client, as clients on another machine would)")
    args = parser.parse_args()

    server = None
    with tempfile.TemporaryDirectory(prefix="bentochat-fairness-") as workdir:
        try:
            if args.served:
                server, run, how = served(args, Path(workdir))
            else:
                run, how = in_process(args)
            results: dict[str, list] = {name: [] for name, *_ in VARIANTS}
            for r in range(args.rounds):
                for name, fair, a_on, b_on in VARIANTS:
                    a, b = Tenant("A", args.a_streams * a_on), Tenant("B", args.b_streams * b_on)
                    before = os.getloadavg()[0]
                    seconds, steps = run(fair, [t for t in (a, b) if t.streams])
                    results[name].append(Result(a, b, seconds, (before + os.getloadavg()[0]) / 2, steps))
                    print(f"round {r + 1}: {name} done", file=sys.stderr, flush=True)
        finally:
            if server is not None:
                server.stop()
    report(results, f"{args.model}, {how}; {args.slots} slots, {args.max_tokens} tokens a request; A: {args.a_streams} "
                    f"streams, B: {args.b_streams}; {args.rounds} rounds; load average of the 1-minute kind, "
                    f"{len(os.sched_getaffinity(0))} cores")


if __name__ == "__main__":
    main()
