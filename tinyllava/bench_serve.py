"""Measure the server: requests per second and latency (the first token, the whole answer) at 1, 4 and 16
clients asking at once.

    python -m tinyllava.bench_serve                  # starts `python -m tinyllava.serve` on a free port
    python -m tinyllava.bench_serve --url http://127.0.0.1:8080/ --clients 1,4,16

Every request asks about a demo photo with one pixel changed, so that the vision tower runs for each (the server
keeps the image tokens of images it has seen, and a conversation's later turns skip the tower), decodes greedily
and streams, up to --max-tokens tokens. Each client sends its next request when its last answer has ended. The
table is Markdown; with the server started here, its memory (RSS) before and after each burst is printed too.
"""
import argparse
import base64
import http.client
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

from .errors import TinyLlavaError, cli_errors


def photos(n, name="chelsea.png"):  # -> n PNG files' bytes, the demo photo with pixel i changed in the i-th
    import numpy as np
    from PIL import Image

    from .weights import demo_photos
    pixels = np.asarray(Image.open(demo_photos()[name]).convert("RGB")).copy()
    out = []
    for i in range(n):
        pixels[0, i % pixels.shape[1]] ^= 1 + i // pixels.shape[1]
        f = io.BytesIO()
        Image.fromarray(pixels).save(f, "PNG")
        out.append(f.getvalue())
    return out


def ask(url, body, key=None):  # one streamed request -> (seconds to the first token, seconds in all, tokens)
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=3600)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, headers)
    reply = conn.getresponse()
    if reply.status != 200:
        raise TinyLlavaError(f"the server answered {reply.status}: {reply.read()[:300].decode(errors='replace')}")
    first, tokens = None, 0
    for line in reply:                                        # server-sent events, one `data:` line each
        if not line.startswith(b"data: {"):
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            first = time.perf_counter() - t0
    conn.close()
    return first if first is not None else float("nan"), time.perf_counter() - t0, tokens


def burst(url, bodies, clients, key=None):  # -> (wall seconds, [(first, whole, tokens)] per request)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda b: ask(url, b, key), bodies))
    return time.perf_counter() - t0, results


def rss_mb(pid):
    try:
        return int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1)) / 1024
    except (OSError, AttributeError):
        return float("nan")


def start_server(args):  # -> (process, URL), once it listens
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "tinyllava.serve", "--port", "0", "--queue", str(max(args.clients) + 1)]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
    while not (m := re.search(r"listening on (http://\S+/)", Path(log.name).read_text())):
        if proc.poll() is not None:
            raise TinyLlavaError(f"the server did not start: {Path(log.name).read_text().strip()[-500:]}")
        time.sleep(0.2)
    print(f"(server: {' '.join(cmd[1:])}, log {log.name})", file=sys.stderr)
    return proc, m.group(1)


def parser():
    ap = argparse.ArgumentParser(prog="python -m tinyllava.bench_serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running server (default: start one here)")
    ap.add_argument("--api-key", help="the running server's key")
    ap.add_argument("--clients", default="1,4,16", help="numbers of clients asking at once (1,4,16)")
    ap.add_argument("--requests", type=int, default=8, help="requests at each number of clients, at least one per "
                    "client (8)")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens an answer may have (32)")
    ap.add_argument("--question", default="What is in the picture?")
    ap.add_argument("-t", "--threads", type=int, help="the started server's --threads")
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    with cli_errors("tinyllava.bench_serve"):
        try:
            args.clients = [int(c) for c in args.clients.split(",")]
        except ValueError:
            raise TinyLlavaError("--clients must be numbers separated by commas, such as 1,4,16") from None
        if min(args.clients) < 1 or args.requests < 1 or args.max_tokens < 1:
            raise TinyLlavaError("--clients, --requests and --max-tokens must be at least 1")
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        proc, url = start_server(args) if not args.url else (None, args.url)
        try:
            counts = [max(args.requests, c) for c in args.clients]
            images = iter(photos(1 + sum(counts)))

            def body():
                url_ = "data:image/png;base64," + base64.b64encode(next(images)).decode()
                return json.dumps({"messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": url_}}, {"type": "text", "text": args.question}]}],
                    "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}).encode()

            ask(url, body(), args.api_key)                    # warm: the first request's one-time costs
            print(f"load average before: {load:.2f}; {args.max_tokens} tokens at most, greedy, streamed; a new "
                  f"image each request\n")
            print("| clients | requests | requests/s | first token, median / max (s) | whole answer, median / max (s) "
                  "| tokens/s (all clients) |" + (" server RSS before -> after (MB) |" if proc else ""))
            print("| --- | --- | --- | --- | --- | --- |" + (" --- |" if proc else ""))
            for clients, n in zip(args.clients, counts):
                before = rss_mb(proc.pid) if proc else None
                wall, results = burst(url, [body() for _ in range(n)], clients, args.api_key)
                first, whole, tokens = zip(*results)
                row = (f"| {clients} | {n} | {n / wall:.2f} | {statistics.median(first):.2f} / {max(first):.2f} | "
                       f"{statistics.median(whole):.2f} / {max(whole):.2f} | {sum(tokens) / wall:.1f} |")
                print(row + (f" {before:.0f} -> {rss_mb(proc.pid):.0f} |" if proc else ""), flush=True)
        finally:
            if proc:
                proc.terminate()
                proc.wait(30)


if __name__ == "__main__":
    main()
