"""Load test of the OpenAI-compatible server: N concurrent streaming clients for T seconds.

    python benchmarks/serve_load.py --spawn MODEL_DIR --clients 32 --seconds 300
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --model NAME --server-pid PID

With --spawn the script starts `python -m unigemma.server.run` itself on a free port (and stops it at the end).
Each client loops: send a streamed chat request, read it to the end, measure time to first token and the gaps
between tokens. Prints one JSON object per line (DESIGN.md §6): throughput, p50/p99 TTFT and inter-token latency,
errors (must be 0), and the server's RSS at start and end (Linux: /proc/PID/status) with its growth in percent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import time

import httpx


def rss_bytes(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


PROMPTS = ["Tell me about the quick brown fox.", "What is the weather in Oslo?", "Describe a red circle.",
           "Name three primes and explain why.", "Write a haiku about snow."]


async def client_loop(i: int, args, stats: dict, deadline: float) -> None:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    rng = random.Random(i)
    async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=120) as c:
        while time.perf_counter() < deadline:
            body = {"model": args.model, "stream": True, "max_tokens": args.max_tokens, "temperature": 0.8,
                    "messages": [{"role": "user", "content": rng.choice(PROMPTS) + f" (client {i})"}],
                    "stream_options": {"include_usage": True}}
            if args.ignore_eos:  # every request decodes max_tokens (a small model's short answers measure HTTP)
                body["ignore_eos"] = True
            t0 = time.perf_counter()
            last = None
            try:
                async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                    if r.status_code != 200:
                        stats["errors"] += 1
                        stats["error_samples"].append(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                        continue
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            stats["errors"] += 1
                            continue
                        if chunk.get("usage"):
                            stats["tokens"] += chunk["usage"]["completion_tokens"]
                        if chunk["choices"] and chunk["choices"][0]["delta"].get("role") is None:
                            now = time.perf_counter()
                            if last is None:
                                stats["ttft"].append(now - t0)
                            else:
                                stats["itl"].append(now - last)
                            last = now
                stats["requests"] += 1
            except httpx.HTTPError as e:
                stats["errors"] += 1
                stats["error_samples"].append(f"{type(e).__name__}: {e}")


def spawn(model_dir: str, args) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "unigemma.server.run", "--model", model_dir, "--port", str(port),
           "--served-model-name", args.model, "--max-concurrency", str(args.max_concurrency),
           "--max-queue", str(max(64, args.clients)), "--log-level", "warning"]
    if args.max_model_len:
        cmd += ["--max-model-len", str(args.max_model_len)]
    if args.device:
        cmd += ["--device", args.device]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not come up in 300 s")


async def main_async(args) -> list[dict]:
    stats = {"ttft": [], "itl": [], "tokens": 0, "requests": 0, "errors": 0, "error_samples": []}
    pid = args.server_pid
    # warm-up request so one-time costs (first forward, allocator) do not count as growth
    async with httpx.AsyncClient(base_url=args.url, timeout=120,
                                 headers={"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}) as c:
        await c.post("/v1/chat/completions", json={"model": args.model, "max_tokens": 4,
                                                   "messages": [{"role": "user", "content": "hi"}]})
    rss0 = rss_bytes(pid)
    t0 = time.perf_counter()
    deadline = t0 + args.seconds
    await asyncio.gather(*(client_loop(i, args, stats, deadline) for i in range(args.clients)))
    wall = time.perf_counter() - t0
    rss1 = rss_bytes(pid)
    common = {"bench": "serve_load", "impl": "unigemma", "device": args.device or platform.machine(),
              "config": args.config, "clients": args.clients, "seconds": args.seconds,
              "max_tokens": args.max_tokens, "max_concurrency": args.max_concurrency}
    rows = [("throughput", stats["tokens"] / wall, "tokens/s"), ("requests", stats["requests"], "count"),
            ("errors", stats["errors"], "count"),
            ("ttft_p50_ms", _ms(pct(stats["ttft"], 50)), "ms"), ("ttft_p99_ms", _ms(pct(stats["ttft"], 99)), "ms"),
            ("itl_p50_ms", _ms(pct(stats["itl"], 50)), "ms"), ("itl_p99_ms", _ms(pct(stats["itl"], 99)), "ms")]
    if rss0 is not None and rss1 is not None:
        rows += [("rss_start_mb", rss0 / 2**20, "MiB"), ("rss_end_mb", rss1 / 2**20, "MiB"),
                 ("rss_growth_pct", 100.0 * (rss1 - rss0) / rss0, "%")]
    out = [{**common, "metric": m, "value": v, "unit": u} for m, v, u in rows]
    for s in stats["error_samples"][:5]:
        print(f"error sample: {s}", file=sys.stderr)
    return out


def _ms(x: float | None) -> float | None:
    return None if x is None else 1000.0 * x


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None)
    p.add_argument("--spawn", metavar="MODEL_DIR", default=None, help="start a server on this checkpoint")
    p.add_argument("--model", default="unigemma", help="model name the server serves")
    p.add_argument("--api-key", default=os.environ.get("UNIGEMMA_API_KEY"))
    p.add_argument("--server-pid", type=int, default=None, help="PID whose RSS to report (with --url)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--ignore-eos", action="store_true", help="requests decode max_tokens tokens whatever the model "
                   "says (unigemma's extension): the decode throughput, not the answers' natural length")
    p.add_argument("--max-concurrency", type=int, default=8, help="with --spawn")
    p.add_argument("--max-model-len", type=int, default=1024, help="with --spawn")
    p.add_argument("--device", default=None)
    p.add_argument("--config", default="tiny", help="label of the model configuration, for the JSON lines")
    args = p.parse_args(argv)
    proc = None
    if args.spawn:
        proc, args.url = spawn(args.spawn, args)
        args.server_pid = proc.pid
    elif not args.url:
        p.error("give --url (a running server) or --spawn MODEL_DIR")
    try:
        rows = asyncio.run(main_async(args))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    for r in rows:
        print(json.dumps(r))
    errors = next(r["value"] for r in rows if r["metric"] == "errors")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
