"""The usage ledger: one JSON line per model request (time, tenant, key id, model, adapter, prompt,
cached and completion tokens, latency, HTTP status), appended to ``usage.jsonl`` in its directory by the
gateway, its only writer. Past ``rotate_bytes`` the file is renamed ``usage-<UTC time>.jsonl`` (the time
its last record precedes) and a new one begun; nothing is ever rewritten. ``usage_page`` sums it in
time buckets for ``GET /v1/usage``, in the shape of OpenAI's usage API.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

logger = logging.getLogger("bentochat.usage")

CURRENT = "usage.jsonl"
ROTATED_TIME = "%Y%m%dT%H%M%S.%fZ"
BUCKET_WIDTHS = {"1m": 60, "1h": 3600, "1d": 86400}
MAX_BUCKETS = 1440
GROUPS = ("model", "key_id")


class Ledger:
    def __init__(self, directory: Path, rotate_bytes: int):
        self.directory, self.rotate_bytes = directory, rotate_bytes
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / CURRENT
        self._file = open(self.path, "a", encoding="utf-8")

    def append(self, record: dict) -> None:
        line = json.dumps(record, separators=(",", ":")) + "\n"
        if self._file.tell() and self._file.tell() + len(line) > self.rotate_bytes:
            self._rotate()
        self._file.write(line)
        self._file.flush()  # in the kernel's hands at once: a crash of this process loses nothing

    def _rotate(self) -> None:
        self._file.close()
        stamp = datetime.now(timezone.utc).strftime(ROTATED_TIME)
        self.path.rename(self.directory / f"usage-{stamp}.jsonl")
        self._file = open(self.path, "a", encoding="utf-8")
        logger.info("usage ledger rotated to usage-%s.jsonl", stamp)

    def records(self, since: float, until: float = float("inf")) -> Iterator[dict]:
        """The records of ``since <= time < until``, oldest first; a rotated file all of whose records
        precede ``since`` is not read. A line cut short (a crash while writing it) is skipped."""
        files = []
        for path in sorted(self.directory.glob("usage-*.jsonl")):
            try:
                ended = datetime.strptime(path.stem.removeprefix("usage-"), ROTATED_TIME).replace(tzinfo=timezone.utc)
            except ValueError:
                continue
            if ended.timestamp() >= since:
                files.append(path)
        for path in (*files, self.path):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except ValueError:
                        continue
                    if since <= record["time"] < until:
                        yield record


def usage_page(ledger: Ledger, tenants: set[str] | None, start_time: int, end_time: int | None,
               bucket_width: str, group_by: list[str]) -> dict:
    """OpenAI's usage API page (``organization.usage.completions``): one bucket per ``bucket_width``
    from ``start_time`` to ``end_time`` (now if None), each with a result per tenant (and per
    ``group_by``: model, key_id) of the records of ``tenants`` (None: all). Refused requests (429)
    count no request."""
    width = BUCKET_WIDTHS[bucket_width]
    end = end_time if end_time is not None else int(time.time()) + 1
    count = -(-(end - start_time) // width)
    if count > MAX_BUCKETS:
        raise ValueError(f"{count} buckets of {bucket_width}; at most {MAX_BUCKETS}: narrow the time range or "
                         "widen bucket_width")
    sums: dict[tuple, dict] = defaultdict(lambda: {"input_tokens": 0, "input_cached_tokens": 0, "output_tokens": 0,
                                                   "num_model_requests": 0})
    for r in ledger.records(start_time, end):
        if tenants is not None and r["tenant"] not in tenants:
            continue
        bucket = int((r["time"] - start_time) // width)
        group = (r["tenant"], *(r.get(g) for g in GROUPS if g in group_by))
        s = sums[bucket, group]
        s["input_tokens"] += r["prompt_tokens"]
        s["input_cached_tokens"] += r["cached_tokens"]
        s["output_tokens"] += r["completion_tokens"]
        s["num_model_requests"] += r["status"] != 429
    results: dict[int, list[dict]] = defaultdict(list)
    for (bucket, group), s in sorted(sums.items(), key=lambda item: (item[0][0], [str(g) for g in item[0][1]])):
        named = dict(zip(("tenant", *(g for g in GROUPS if g in group_by)), group))
        results[bucket].append({"object": "organization.usage.completions.result", **s, "tenant": named["tenant"],
                                "model": named.get("model"), "key_id": named.get("key_id")})
    data = [{"object": "bucket", "start_time": start_time + i * width,
             "end_time": min(start_time + (i + 1) * width, end), "results": results[i]} for i in range(count)]
    return {"object": "page", "data": data, "has_more": False, "next_page": None}
