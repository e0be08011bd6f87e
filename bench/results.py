"""The benchmark's results: each row printed as soon as it is measured and appended to a JSON-lines
file, each failure too; at the end the table of everything measured, each server's memory, the
failures and BentoChat's ratios to the others."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from bench.load import Run, pct
from bench.servers import MIB, Server, ServerFailed

BENTOCHAT = "bentochat (HTTP)"


def ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f}"


def num(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


HEADER = (f"{'system':<34}{'load':<20}{'conc':>5}{'tok/s':>9}{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p50':>9}"
          f"{'prompt tok/s':>14}{'peak RSS MiB':>14}")


def line(row: dict) -> str:
    return (f"{row['system']:<34}{row['load']:<20}{row['concurrency']:>5}{num(row.get('tok_s')):>9}"
            f"{ms(row.get('ttft_p50')):>10}{ms(row.get('ttft_p99')):>10}{ms(row.get('itl_p50')):>9}"
            f"{num(row.get('prompt_tok_s'), 0):>14}{num(row.get('peak_rss_mib'), 0):>14}")


class Results:
    def __init__(self, out: Path, meta: dict):
        self.out, self.meta = out, meta
        self.rows: list[dict] = []
        self.failures: list[dict] = []
        self.servers: list[dict] = []
        self._header = False
        self._reasons: dict[str, str] = {}
        out.parent.mkdir(parents=True, exist_ok=True)
        self._write({"kind": "run", **meta})

    def _write(self, record: dict) -> None:
        record = {"time": datetime.datetime.now().isoformat(timespec="seconds"), "run": self.meta["run"], **record}
        with open(self.out, "a") as f:
            f.write(json.dumps(record) + "\n")

    def row(self, system: str, load: str, concurrency: int, run: Run | None = None, *, tok_s: float | None = None,
            itl: float | None = None, server: Server | None = None) -> dict:
        row = {"system": system, "load": load, "concurrency": concurrency}
        if run is not None:
            row.update(tok_s=run.tps, ttft_p50=pct(run.ttft, .5), ttft_p99=pct(run.ttft, .99), itl_p50=pct(run.itl, .5),
                       prompt_tok_s=run.prompt_tps or None, output_tokens=run.tokens, prompt_tokens=run.prompt_tokens,
                       requests=run.requests, seconds=run.seconds)
        else:
            row.update(tok_s=tok_s, itl_p50=itl)
        if server is not None and server.memory is not None:
            row["peak_rss_mib"] = server.memory.peak / MIB  # the server's, so far
            row["peak_pss_mib"] = server.memory.pss_peak / MIB
        self.rows.append(row)
        self._write({"kind": "row", **row})
        if not self._header:
            print(HEADER, flush=True)
            self._header = True
        print(line(row), flush=True)
        return row

    def failed(self, system: str, load: str, failure: ServerFailed) -> None:
        record = {"system": system, "load": load, "reason": failure.reason, "log_tail": failure.log_tail}
        self.failures.append(record)
        self._write({"kind": "failure", **record})
        print(f"!! {system}{' ' + load if load else ''}: {failure.reason}", flush=True)
        if failure.reason != self._reasons.get(system):  # (not again when the next load meets the same)
            self._reasons[system] = failure.reason
            for text in failure.log_tail:
                print(f"   | {text[:200]}", flush=True)

    def server(self, system: str, server: Server) -> None:
        """The memory of a server that has stopped: resident once ready, peak, largest process's peak."""
        if server.memory is None or (server.ready_s is None and server.memory.peak < 64 * MIB):
            return  # (one that failed before it held anything: its failure says it all)
        m = server.memory
        record = {"system": system, "ready_s": server.ready_s, "rss_ready_mib": server.rss_ready / MIB,
                  "peak_rss_mib": m.peak / MIB, "pss_ready_mib": server.pss_ready / MIB, "peak_pss_mib": m.pss_peak / MIB,
                  "max_process_hwm_mib": m.hwm / MIB, "processes": len(m.names)}
        self.servers.append(record)
        self._write({"kind": "server", **record})

    def report(self) -> None:
        m = self.meta
        print(f"\n{m['model']} ({m['description']}), {m['settings']}; CPU: {m['cpu']}\n"
              f"results: {self.out}; TTFT and ITL in ms\n")
        if self.rows:
            print(HEADER)
            for row in self.rows:
                print(line(row))
        if self.servers:
            print("\nmemory, MiB: the server and every process it started; RSS summed over them (sampled every "
                  "0.25 s), PSS (shared pages split between them; every 2 s), the largest VmHWM of one of them")
            print(f"{'system':<34}{'ready in s':>11}{'RSS ready':>11}{'peak RSS':>10}{'PSS ready':>11}{'peak PSS':>10}"
                  f"{'largest VmHWM':>15}{'procs':>7}")
            for s in self.servers:
                print(f"{s['system']:<34}{num(s['ready_s']):>11}{s['rss_ready_mib']:>11.0f}{s['peak_rss_mib']:>10.0f}"
                      f"{s['pss_ready_mib']:>11.0f}{s['peak_pss_mib']:>10.0f}{s['max_process_hwm_mib']:>15.0f}"
                      f"{s['processes']:>7}")
        if self.failures:
            print("\nfailed or skipped")
            for f in self.failures:
                print(f"  {f['system']}{' ' + f['load'] if f['load'] else ''}: {f['reason']}")
        self.ratios()

    def ratios(self) -> None:
        by = {(r["system"], r["load"], r["concurrency"]): r for r in self.rows}
        others = list(dict.fromkeys(r["system"] for r in self.rows if r["system"] != BENTOCHAT))
        lines = []
        for (system, load, c), r in by.items():
            if system != BENTOCHAT or not r.get("tok_s") or load.startswith("lora"):
                continue
            parts = []
            if load == "json_schema" and by.get((BENTOCHAT, "chat", c), {}).get("tok_s"):
                parts.append(f"{r['tok_s'] / by[BENTOCHAT, 'chat', c]['tok_s']:.2f}x the same load without a schema")
            for other in others if load != "json_schema" else []:
                keys = [(other, load, c)] + ([(other, "decode", c), (other, "generate", c)] if load == "chat" else [])
                o = next((by[k] for k in keys if k in by), None)
                if o is None or not o.get("tok_s"):
                    continue
                if load.startswith("long"):
                    ratio = f", prompt tok/s {r['prompt_tok_s'] / o['prompt_tok_s']:.2f}x" if o.get("prompt_tok_s") else ""
                    parts.append(f"{other}: TTFT p50 {ms(r['ttft_p50'])} vs {ms(o.get('ttft_p50'))} ms{ratio}")
                else:
                    parts.append(f"{r['tok_s'] / o['tok_s']:.2f}x {other} (TTFT p50 {ms(r.get('ttft_p50'))} vs "
                                 f"{ms(o.get('ttft_p50'))} ms)")
            if parts:
                lines.append(f"  bentochat {load} c={c}: " + ", ".join(parts))
        base = [r["tok_s"] for r in self.rows if r["system"] == BENTOCHAT and r["load"] == "lora base alone"]
        mixed = [r["tok_s"] for r in self.rows if r["system"] == BENTOCHAT and r["load"] == "lora mixed"]
        if base and mixed:
            ratios = [m / b for b, m in zip(base, mixed)]
            lines.append(f"  bentochat lora: mixed adapters {', '.join(f'{x:.2f}x' for x in ratios)} the base alone's "
                         f"tokens/s (mean {sum(ratios) / len(ratios):.2f}x)")
        if lines:
            print("\nratios (BentoChat to each, same run)")
            print("\n".join(lines))
