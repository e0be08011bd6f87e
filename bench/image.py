"""The image against `make serve`: the same closed-loop load of streaming chats (bench/load.py) on the image
`make image` built, run by podman (or Docker's engine), and on `bentoml serve service:BentoChat` from this
checkout, one after the other and alternated ``--rounds`` times, each started fresh and stopped after its
loads. Prints a table (tokens/s, TTFT, ITL, seconds to ready) and each round's ratio image / serve. Both
should log the same level of the native kernels (the log lines are printed). Timings only: it asserts
nothing.

    make image && .venv/bin/python bench/image.py --image bentochat-cpu:TAG
    .venv/bin/python bench/image.py --image bentochat-cpu:TAG --concurrency 8 32 --requests 8 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from load import closed_loop, drive_http, pct  # noqa: E402

KERNELS = "BentoChat's native kernels:"


def ready(url: str, limit: float = 600) -> float:
    start = time.monotonic()
    while time.monotonic() - start < limit:
        try:
            if urllib.request.urlopen(url + "/readyz", timeout=2).status == 200:
                return time.monotonic() - start
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready in {limit:.0f} s")


class Serve:
    """`bentoml serve` from this checkout (what `make serve` runs once installed)."""

    name = "make serve"

    def __init__(self, port: int, log: Path):
        self.port, self.log = port, log

    def start(self) -> str:
        out = open(self.log, "a")
        self.proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", "service:BentoChat", "--port", str(self.port)],
                                     cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(60)


class Container:
    name = "image"

    def __init__(self, engine: str, image: str, port: int, log: Path):
        self.engine, self.image, self.port, self.log = engine, image, port, log
        self.container = f"bentochat-bench-{os.getpid()}"

    def start(self) -> str:
        subprocess.run([self.engine, "rm", "-f", self.container], capture_output=True)
        subprocess.run([self.engine, "run", "-d", "--name", self.container, "-p", f"{self.port}:3000", self.image],
                       check=True, capture_output=True)
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        with open(self.log, "a") as out:
            subprocess.run([self.engine, "logs", self.container], stdout=out, stderr=subprocess.STDOUT)
        subprocess.run([self.engine, "rm", "-f", "-t", "30", self.container], capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", required=True, help="the image's name:tag (`podman images`)")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="the chat model's id in bentochat.yaml")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[32])
    parser.add_argument("--requests", type=int, default=8, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--port", type=int, default=3301, help="make serve's port; the image's is the next one")
    args = parser.parse_args()

    import bentoml
    from transformers import AutoTokenizer

    engine = next((e for e in ("podman", "docker") if shutil.which(e)), None)
    if engine is None:
        sys.exit("no container engine (podman or docker)")
    tokenizer = AutoTokenizer.from_pretrained(bentoml.models.get(f"{args.model}:latest").path)
    logs = Path(tempfile.mkdtemp(prefix="bentochat-bench-image-"))
    systems = [Serve(args.port, logs / "serve.log"), Container(engine, args.image, args.port + 1, logs / "image.log")]
    print(f"logs in {logs}; load average {os.getloadavg()[0]:.2f}", flush=True)
    print(f"{'system':<12}{'round':>6}{'conc':>6}{'tok/s':>9}{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p50':>9}{'ready s':>9}")
    tps: dict[tuple[str, int, int], float] = {}
    for rnd in range(args.rounds):
        for system in systems:
            url = system.start()
            try:
                up = ready(url)
                for c in args.concurrency:
                    run = asyncio.run(drive_http(url, closed_loop(args.model, c, args.requests), tokenizer, args.max_tokens))
                    tps[system.name, rnd, c] = run.tps
                    print(f"{system.name:<12}{rnd:>6}{c:>6}{run.tps:>9.1f}{pct(run.ttft, .5) * 1e3:>10.0f}"
                          f"{pct(run.ttft, .99) * 1e3:>10.0f}{pct(run.itl, .5) * 1e3:>9.1f}{up:>9.1f}", flush=True)
            finally:
                system.stop()
    for c in args.concurrency:
        ratios = [tps["image", r, c] / tps["make serve", r, c] for r in range(args.rounds)]
        print(f"image / make serve at concurrency {c}: " + ", ".join(f"{x:.2f}x" for x in ratios))
    for system in systems:
        lines = {line.split(KERNELS, 1)[1].strip() for line in system.log.read_text().splitlines() if KERNELS in line}
        print(f"{system.name}: {'; '.join(sorted(lines)) or 'no kernels line in its log'}")


if __name__ == "__main__":
    main()
