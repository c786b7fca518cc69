#!/usr/bin/env python
"""Benchmark: the web app under load, on this machine's loopback interface only.

What it does
1. Unless --index is given: generates captioned shapes (--images at --size), trains a small CLIP with the demo
   recipe for --clip-steps (speed is what is measured here, not search quality) and indexes the images with
   `clipsnail.inference.index.build_index`. All of it is kept in --work and reused by the next run.
2. Starts `clipsnail serve --index ...` in a subprocess on 127.0.0.1 (a free port) and waits for /api/info.
3. Sends, with at most --concurrency requests in flight (httpx.AsyncClient, one connection per slot):
   - search: --requests text searches GET /api/search?q=...&k=--k, the queries drawn from a few hundred distinct
     shape descriptions;
   - thumb:  --requests thumbnails GET /api/thumb/{id} of random ids (the server caches 1,024);
   - image:  --requests // 10 image searches POST /api/search/image with an indexed image as the upload;
   - big:    --big-uploads image searches with large photos (--big-size, default 7360x4912 = 36 Mpx: JPEGs made
     here, smooth enough to stay under the 10 MB upload limit), --big-concurrency (8) in flight. The server's
     memory is sampled from /proc/PID/status every 10 ms: VmRSS just before, the highest VmRSS during (and VmHWM,
     the kernel's own peak), and VmRSS 3 s after the last answer.
   Each phase reports throughput, latency p50/p90/p99/max and its error count (anything but HTTP 200, or no
   answer), which must be 0.
4. Two attacks from one client, 127.0.0.2 (all of 127.0.0.0/8 is loopback), run in a child process while plain
   searches (`dog`, k=10) are sent from 127.0.0.1 by --probe-workers workers, each waiting 0.1 s between searches;
   their latency is recorded (percentiles over the searches answered 200; any other answer, or none, is a failure):
   - slow_body:  --slow-bodies sockets send the headers of an image upload with `Content-Length: 1000000` and
     then one body byte every --slow-body-every seconds, for --slow-body-s seconds (no reconnection). Each
     socket's fate is counted: closed before its first body byte (over the server's per-client cap), answered
     (408 at the body deadline), closed without an answer, or still open at the end.
   - many_terms: --many-terms-connections workers (one connection each) send text searches of --terms terms
     (`a + a + ... + a`; `a1 + a2 + ...` with --distinct-terms) for --many-terms-s seconds; their answers are
     counted by status, and a worker whose connection is refused or dropped tries again after 1 s.
5. Stops the server, writes bench/results/serve_load.json and prints a table. Exit status 1 if any request of
   the load phases failed (the attacks' searches are reported, not checked: --probe-target-s is the goal for them).

Client and server share the machine's cores, so on a 2-core CPU the figures are a floor for the server alone.

    .venv/bin/python bench/serve_load.py                 # ~2.5 min the first time (data, CLIP, index), then 1 min
    .venv/bin/python bench/serve_load.py --index DIR     # an existing index, its own CLIP
    .venv/bin/python bench/serve_load.py --quick         # 300 images, 30 CLIP steps, 200 requests: the plumbing
    .venv/bin/python bench/serve_load.py --attacks-only  # the two attacks only (~1 min)

To compare with another version of the server, run the server from that version's source tree:

    mkdir -p runs/old && git archive COMMIT src | tar -x -C runs/old
    .venv/bin/python bench/serve_load.py --server-src runs/old/src --out runs/serve_load_old.json
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import _common

_common.use_source_tree()
say = _common.say


def prepare_index(work: Path, n: int, size: int, clip_steps: int, threads: int) -> Path:
    import torch

    from clipsnail.apps.demo import demo_config
    from clipsnail.apps.hub import load
    from clipsnail.data.shapes import generate_shapes
    from clipsnail.inference.index import ImageIndex, build_index
    from clipsnail.tasks.clip import ClipTask
    from clipsnail.train.engine import fit

    torch.set_num_threads(threads)
    data, run, index_dir = work / "shapes", work / "clip", work / "index"
    if not (data / "scenes.json").exists():
        say(f"data: {n} shapes at {size}x{size} -> {data}")
        generate_shapes(data, n, size=size, seed=0, captions_per_image=3, overwrite=True)
    if not (run / "model.safetensors").exists():
        say(f"CLIP: demo recipe, {clip_steps} steps -> {run}")
        cfg = demo_config(data, clip_steps)
        # the demo's CLIP as these results were measured with it: its text tower before the demo's was made smaller
        text = {"width": 192, "heads": 3, "depth": 4}
        cfg = dataclasses.replace(cfg, model=cfg.model.with_changes(vision={"image_size": size}, text=text))
        fit(ClipTask(cfg, run_dir=run), run, progress=False)
    try:
        ImageIndex.load(index_dir)
    except Exception:
        say(f"index: {data / 'images'} -> {index_dir}")
        build_index(load(run), data / "images", index_dir, progress=False)
    return index_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index: Path, port: int, log_path: Path, src: Path) -> tuple[subprocess.Popen, float]:
    import httpx

    env = dict(os.environ, PYTHONPATH=str(src) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = open(log_path, "w")
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "clipsnail", "serve", "--index", str(index), "--host",
                             "127.0.0.1", "--port", str(port)], cwd=_common.ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}; see {log_path}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/info", timeout=2).status_code == 200:
                return proc, time.perf_counter() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_server(proc)
    raise SystemExit(f"the server did not answer within 180 s; see {log_path}")


class RssSampler:
    """The highest VmRSS of a process, sampled every `interval` seconds on a thread while in the `with` block."""

    def __init__(self, pid: int, interval: float = 0.01):
        self.pid, self.interval, self.peak, self.samples = pid, interval, 0.0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            rss = _common.proc_status_mib("VmRSS", self.pid)
            if rss is not None:
                self.peak, self.samples = max(self.peak, rss), self.samples + 1
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def big_jpegs(count: int, width: int, height: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """`count` different width x height JPEGs, smooth like a photo of sky and walls (a few MB each at quality 90;
    noise would push them past the upload limit). Each has its own gradients, so nothing is cached."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    out = []
    for i in range(count):
        f = rng.uniform(1, 6, size=(3, 2))
        channels = [(127 + 120 * np.sin(2 * np.pi * (f[c, 0] * x + f[c, 1] * y * x + i / count))).astype(np.uint8)
                    for c in range(3)]
        buffer = io.BytesIO()
        Image.fromarray(np.stack(channels, axis=-1)).save(buffer, format="JPEG", quality=90)
        out.append((f"big{i}.jpg", buffer.getvalue()))
    return out


def big_upload_phase(base: str, pid: int, uploads: list[tuple[str, bytes]], pixels: int, count: int,
                     concurrency: int, k: int) -> dict:
    requests = [{"method": "POST", "url": "/api/search/image", "data": {"k": str(k)},
                 "files": {"file": uploads[i % len(uploads)]}} for i in range(count)]
    time.sleep(1)  # let the previous phase's memory settle
    before = _common.proc_status_mib("VmRSS", pid)
    with RssSampler(pid) as sampler:
        result = asyncio.run(load_phase(base, requests, concurrency))
    time.sleep(3)
    result.update({
        "upload_pixels": pixels, "upload_mib_mean": round(sum(len(d) for _, d in uploads) / len(uploads) / 2**20, 2),
        "rss_before_mib": before, "rss_peak_during_mib": sampler.peak, "rss_samples": sampler.samples,
        "vm_hwm_after_mib": _common.proc_status_mib("VmHWM", pid),
        "rss_after_mib": _common.proc_status_mib("VmRSS", pid)})
    return result


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # uvicorn shuts down cleanly on SIGINT
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def queries(count: int, seed: int) -> list[str]:
    from clipsnail.data.shapes import COLORS, SHAPES

    colours, kinds = list(COLORS), list(SHAPES)
    forms = ["a {c} {k}", "a small {c} {k}", "a large {c} {k}", "a {c} {k} and a {c2} {k2}", "{c} shapes",
             "a picture of a {k}", "two {c} things", "🐌 {c} {k}"]
    rng = random.Random(seed)
    return [rng.choice(forms).format(c=rng.choice(colours), k=rng.choice(kinds), c2=rng.choice(colours),
                                     k2=rng.choice(kinds)) for _ in range(count)]


async def load_phase(base: str, requests: list[dict], concurrency: int) -> dict:
    """Send the requests with at most `concurrency` in flight -> throughput, latency percentiles, errors."""
    import httpx

    latencies: list[float] = []
    errors: dict[str, int] = {}
    todo = iter(requests)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as client:
        async def worker():
            for req in todo:
                t = time.perf_counter()
                try:
                    r = await client.request(req["method"], req["url"], params=req.get("params"),
                                             files=req.get("files"), data=req.get("data"))
                    ok = r.status_code == 200
                    key = None if ok else f"HTTP {r.status_code}"
                except httpx.HTTPError as e:
                    ok, key = False, type(e).__name__
                latencies.append(time.perf_counter() - t)
                if not ok:
                    errors[key] = errors.get(key, 0) + 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    ms = sorted(x * 1000 for x in latencies)

    def pct(p):
        return round(ms[min(len(ms) - 1, int(round(p / 100 * (len(ms) - 1))))], 1)

    return {"requests": len(ms), "concurrency": concurrency, "seconds": round(seconds, 2),
            "throughput_rps": round(len(ms) / seconds, 1), "latency_ms_mean": round(statistics.fmean(ms), 1),
            "latency_ms_p50": pct(50), "latency_ms_p90": pct(90), "latency_ms_p99": pct(99),
            "latency_ms_max": round(ms[-1], 1), "errors": sum(errors.values()), "error_kinds": errors}


# ----------------------------------------------------------------------------------------------- attacks

ATTACKER, PROBE_CLIENT = "127.0.0.2", "127.0.0.1"


def slow_upload_head(port: int) -> bytes:
    return (f"POST /api/search/image HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 1000000\r\n"
            "Content-Type: multipart/form-data; boundary=x\r\n\r\n--x\r\n"
            'Content-Disposition: form-data; name="file"; filename="a.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
            ).encode()


async def slow_bodies(port: int, count: int, every: float, seconds: float, ready) -> dict:
    """`count` sockets from ATTACKER, each sending an upload's headers and then a body byte every `every` s until
    the server closes it or `seconds` have passed since they were all opened. Each one's fate: closed before its
    first body byte (refused at once), answered (with what status), closed without an answer, or open at the end."""
    loop = asyncio.get_running_loop()
    head = slow_upload_head(port)
    fates: dict[str, int] = {}
    closed_after: dict[str, list[float]] = {}  # fate -> seconds from the headers to the server's close
    attempts, all_tried, window = [0], asyncio.Event(), {"end": math.inf}

    def note(fate: str, seconds_open: float | None = None):
        fates[fate] = fates.get(fate, 0) + 1
        if seconds_open is not None:
            closed_after.setdefault(fate, []).append(seconds_open)

    def tried():
        attempts[0] += 1
        if attempts[0] == count:
            all_tried.set()

    async def one():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(ATTACKER, 0))
            writer.write(head)
            await writer.drain()
        except OSError as e:
            tried()
            return note(f"connect failed: {type(e).__name__}")
        tried()
        opened, answer, sent, closed = loop.time(), b"", 0, False
        try:
            while not closed and loop.time() < window["end"]:
                try:
                    chunk = await asyncio.wait_for(reader.read(4096), timeout=min(every, window["end"] - loop.time()))
                except asyncio.TimeoutError:
                    writer.write(b"a")
                    await writer.drain()
                    sent += 1
                    continue
                answer, closed = answer + chunk, not chunk
        except OSError:  # reset: closed by the server with bytes of ours unread
            closed = True
        writer.close()
        if answer:
            status = answer.split(b"\r\n", 1)[0].decode(errors="replace").removeprefix("HTTP/1.1 ")
            note(f"answered {status}", loop.time() - opened if closed else None)
        elif closed:
            note("closed before its first body byte" if sent == 0 else "closed without an answer",
                 loop.time() - opened)
        else:
            note("open at the end")

    tasks = [asyncio.create_task(one()) for _ in range(count)]
    await all_tried.wait()
    window["end"] = loop.time() + seconds
    ready()
    await asyncio.gather(*tasks)
    return {"sockets": count, "every_s": every, "seconds": seconds, "fates": fates,
            "closed_after_s": {fate: {"min": round(min(t), 2), "median": round(statistics.median(t), 2),
                                      "max": round(max(t), 2)} for fate, t in closed_after.items()}}


async def many_terms(port: int, connections: int, terms: int, distinct: bool, seconds: float, ready) -> dict:
    """`connections` workers from ATTACKER sending searches of `terms` terms (`a + a + ...`, or `a1 + a2 + ...`
    when `distinct`) for `seconds` s."""
    import httpx

    query = " + ".join(f"a{i + 1}" if distinct else "a" for i in range(terms))
    statuses: dict[str, int] = {}
    end = asyncio.get_running_loop().time() + seconds

    async def worker():
        transport = httpx.AsyncHTTPTransport(local_address=ATTACKER)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", transport=transport, timeout=60,
                                     limits=httpx.Limits(max_connections=1)) as client:
            while asyncio.get_running_loop().time() < end:
                try:
                    r = await client.get("/api/search", params={"q": query, "k": 10})
                    key = f"HTTP {r.status_code}"
                except httpx.HTTPError as e:
                    key = type(e).__name__
                statuses[key] = statuses.get(key, 0) + 1
                if not key.startswith("HTTP"):
                    await asyncio.sleep(1.0)

    tasks = [asyncio.create_task(worker()) for _ in range(connections)]
    ready()
    await asyncio.gather(*tasks)
    return {"connections": connections, "terms": terms, "distinct": distinct, "query": query,
            "seconds": seconds, "answers": statuses}


def attack_process(pipe, kind: str, port: int, params: dict) -> None:
    """In a child process, so that the attack's own client work does not run in the probes' event loop."""
    attack = {"slow_body": slow_bodies, "many_terms": many_terms}[kind]
    result = asyncio.run(attack(port, **params, ready=lambda: pipe.send("ready")))
    pipe.send(result)


async def probes(base: str, until: float, workers: int) -> dict:
    """Plain text searches from PROBE_CLIENT until time.monotonic() reaches `until`."""
    import httpx

    latencies: list[float] = []
    failures: dict[str, int] = {}

    async with httpx.AsyncClient(base_url=base, timeout=30, transport=httpx.AsyncHTTPTransport(
            local_address=PROBE_CLIENT)) as client:
        async def worker():
            while time.monotonic() < until:
                t = time.perf_counter()
                try:
                    r = await client.get("/api/search", params={"q": "dog", "k": 10})
                    key = None if r.status_code == 200 else f"HTTP {r.status_code}"
                except httpx.HTTPError as e:
                    key = type(e).__name__
                if key is None:
                    latencies.append(time.perf_counter() - t)
                else:
                    failures[key] = failures.get(key, 0) + 1
                await asyncio.sleep(0.1)

        await asyncio.gather(*(worker() for _ in range(workers)))
    s = sorted(latencies)

    def pct(p):
        return round(s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))], 3) if s else None

    return {"searches": len(s) + sum(failures.values()), "answered": len(s), "failures": sum(failures.values()),
            "failure_kinds": failures, "p50_s": pct(50), "p99_s": pct(99), "max_s": round(s[-1], 3) if s else None}


def attack_phase(kind: str, base: str, port: int, params: dict, seconds: float, probe_workers: int) -> dict:
    """Start the attack in a child process and, once it is under way, send probe searches until it ends."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=attack_process, args=(theirs, kind, port, params), daemon=True)
    child.start()
    try:
        if not ours.poll(120) or ours.recv() != "ready":
            raise SystemExit(f"{kind}: the attack did not start")
        probe = asyncio.run(probes(base, time.monotonic() + seconds, probe_workers))
        if not ours.poll(seconds + 60):
            raise SystemExit(f"{kind}: the attack did not end")
        attack = ours.recv()
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()
    return {"attack": attack, "probe": probe}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", help="an existing index (default: build one over shapes in --work)")
    p.add_argument("--work", default=str(_common.ROOT / "runs" / "bench_serve"))
    p.add_argument("--images", type=int, default=2000, help="shapes images to index")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--clip-steps", type=int, default=300)
    p.add_argument("--requests", type=int, default=2000, help="per phase (image search: a tenth)")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--threads", type=int, default=2, help="torch threads while preparing")
    p.add_argument("--big-uploads", type=int, default=16, help="large-photo image searches (0: skip the phase)")
    p.add_argument("--big-concurrency", type=int, default=8)
    p.add_argument("--big-size", default="7360x4912", help="WIDTHxHEIGHT of the large photos (36 Mpx)")
    p.add_argument("--slow-bodies", type=int, default=255, help="slow_body attack: sockets (0: skip the attack)")
    p.add_argument("--slow-body-every", type=float, default=2.0, help="slow_body: seconds between body bytes")
    p.add_argument("--slow-body-s", type=float, default=35.0,
                   help="slow_body: how long it lasts (past the server's 30 s body deadline)")
    p.add_argument("--many-terms-connections", type=int, default=100,
                   help="many_terms attack: connections (0: skip the attack)")
    p.add_argument("--terms", type=int, default=50, help="many_terms: terms a query")
    p.add_argument("--distinct-terms", action="store_true", help="many_terms: a1 + a2 + ... rather than a + a + ...")
    p.add_argument("--many-terms-s", type=float, default=20.0, help="many_terms: how long it lasts")
    p.add_argument("--probe-workers", type=int, default=2, help="plain searches in flight during an attack")
    p.add_argument("--probe-target-s", type=float, default=2.0, help="the goal for a plain search's p99 under attack")
    p.add_argument("--attacks-only", action="store_true", help="skip the load phases (search, thumb, image, big)")
    p.add_argument("--server-src", default=str(_common.ROOT / "src"),
                   help="the source tree the server runs from (default: this checkout's src/)")
    p.add_argument("--quick", action="store_true", help="300 images, 30 CLIP steps, 200 requests")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.quick:
        args.images, args.clip_steps, args.requests = 300, 30, 200
        args.work = args.work + "_quick"
    return args


def main() -> None:
    args = parse_args()
    out = Path(args.out or _common.RESULTS / ("serve_load_quick.json" if args.quick else
                                              "serve_load_attacks.json" if args.attacks_only else "serve_load.json"))
    machine = _common.machine_info()

    t = time.perf_counter()
    index = Path(args.index) if args.index else prepare_index(Path(args.work), args.images, args.size,
                                                              args.clip_steps, args.threads)
    prepare_s = round(time.perf_counter() - t, 1)
    n_images, uploads = sample_uploads(index)

    port = free_port()
    log_path = Path(args.work) / "server.log" if not args.index else out.with_suffix(".server.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    big_width, big_height = (int(v) for v in args.big_size.lower().split("x"))
    big = []
    if args.big_uploads and not args.attacks_only:
        say(f"big: making {args.big_concurrency} JPEGs of {big_width}x{big_height}")
        big = big_jpegs(args.big_concurrency, big_width, big_height)
    say(f"server: clipsnail serve --index {index} on 127.0.0.1:{port} from {args.server_src} (log {log_path})")
    proc, startup_s = start_server(index, port, log_path, Path(args.server_src))
    base = f"http://127.0.0.1:{port}"
    phases = load_phases(args, n_images, uploads)
    results, attacks, server_rss = {}, {}, None
    try:
        asyncio.run(load_phase(base, phases["search"][:20], 4))  # warm-up: first calls, thread pool, caches
        if not args.attacks_only:
            results, server_rss = run_load(base, proc.pid, phases, big, (big_width, big_height), args)
        attacks = run_attacks(base, port, args)
    finally:
        stop_server(proc)
    summary = attack_summary(attacks, args.probe_target_s)

    errors = sum(r["errors"] for r in results.values())
    data = _common.envelope(
        benchmark="serve_load",
        machine=machine,
        config=run_config(args, index, n_images, [big_width, big_height]),
        results={"prepare_s": prepare_s, "server_startup_s": round(startup_s, 1),
                 "server_peak_rss_mib": server_rss, "errors": errors, **summary, **results, "attacks": attacks},
        notes="Loopback only; the httpx client runs on the same cores as the server (one uvicorn worker, model "
              "calls serialised by a lock). Latency is per request as the client sees it, queueing included. "
              "server_peak_rss_mib is VmHWM after the search, thumb and image phases (before big); big's "
              "rss_* figures are the server's VmRSS before, at its highest during (sampled every 10 ms) and "
              "3 s after that phase. Attacks: one client (127.0.0.2) in a child process; the *_p50_s / *_p99_s "
              "figures are of the plain searches (q=dog, from 127.0.0.1) answered 200 meanwhile, *_failures "
              "counts the others (503, errors); calm is the same searches with no attack.",
    )
    _common.write_json(out, data)
    print_load(results, n_images, startup_s, server_rss, out)
    print_attacks(attacks, summary, args.probe_target_s)
    if "big" in results:
        b = results["big"]
        say(f"big uploads: server RSS {b['rss_before_mib']} MiB before, {b['rss_peak_during_mib']} MiB at most "
            f"during, {b['rss_after_mib']} MiB after (VmHWM {b['vm_hwm_after_mib']} MiB)")
    if errors:
        raise SystemExit(f"{errors} requests failed")


def sample_uploads(index: Path) -> tuple[int, list[tuple[str, bytes]]]:
    """(images in the index, up to 50 of its images as (file name, bytes) for image searches)."""
    from clipsnail.inference.index import ImageIndex

    loaded = ImageIndex.load(index)
    n_images = len(loaded)
    upload_paths = [loaded.paths[i] for i in random.Random(1).sample(range(n_images), min(n_images, 50))]
    return n_images, [(p.name, p.read_bytes()) for p in upload_paths]


def load_phases(args, n_images: int, uploads: list[tuple[str, bytes]]) -> dict[str, list[dict]]:
    """The requests of the search, thumb and image phases (a fixed seed: the same requests every run)."""
    rng = random.Random(0)
    return {
        "search": [{"method": "GET", "url": "/api/search", "params": {"q": q, "k": args.k}}
                   for q in queries(args.requests, 0)],
        "thumb": [{"method": "GET", "url": f"/api/thumb/{rng.randrange(n_images)}"} for _ in range(args.requests)],
        "image": [{"method": "POST", "url": "/api/search/image", "data": {"k": str(args.k)},
                   "files": {"file": rng.choice(uploads)}} for _ in range(max(1, args.requests // 10))],
    }


def run_load(base: str, pid: int, phases: dict, big: list, big_size: tuple[int, int], args) -> tuple[dict, float]:
    """The load phases, then the large-photo phase when there are large photos: (results by phase, the server's
    VmHWM before the large photos)."""
    results = {}
    for name, reqs in phases.items():
        say(f"{name}: {len(reqs)} requests, {args.concurrency} in flight")
        results[name] = asyncio.run(load_phase(base, reqs, args.concurrency))
    server_rss = _common.proc_status_mib("VmHWM", pid)
    if big:
        big_width, big_height = big_size
        say(f"big: {args.big_uploads} uploads of {big_width}x{big_height} JPEGs, "
            f"{args.big_concurrency} in flight")
        results["big"] = big_upload_phase(base, pid, big, big_width * big_height, args.big_uploads,
                                          args.big_concurrency, args.k)
    return results, server_rss


def run_attacks(base: str, port: int, args) -> dict:
    """Plain searches with no attack (calm), then under each attack that is not switched off."""
    attacks = {}
    say(f"calm: plain searches for 10 s, {args.probe_workers} in flight, no attack")
    attacks["calm"] = {"probe": asyncio.run(probes(base, time.monotonic() + 10, args.probe_workers))}
    if args.slow_bodies:
        say(f"slow_body: {args.slow_bodies} sockets from {ATTACKER}, a body byte every {args.slow_body_every} s "
            f"for {args.slow_body_s} s; plain searches meanwhile")
        attacks["slow_body"] = attack_phase(
            "slow_body", base, port, {"count": args.slow_bodies, "every": args.slow_body_every,
                                      "seconds": args.slow_body_s}, args.slow_body_s, args.probe_workers)
    if args.many_terms_connections:
        say(f"many_terms: {args.many_terms_connections} connections from {ATTACKER} searching {args.terms} "
            f"terms for {args.many_terms_s} s; plain searches meanwhile")
        params = {"connections": args.many_terms_connections, "terms": args.terms,
                  "distinct": args.distinct_terms, "seconds": args.many_terms_s}
        attacks["many_terms"] = attack_phase("many_terms", base, port, params, args.many_terms_s,
                                             args.probe_workers)
    return attacks


def attack_summary(attacks: dict, target_s: float) -> dict:
    """Each attack's plain-search p50, p99 and failures, and whether its p99 is under the target."""
    summary = {}
    for name, a in attacks.items():
        p99 = a["probe"]["p99_s"]
        summary.update({f"{name}_p50_s": a["probe"]["p50_s"], f"{name}_p99_s": p99,
                        f"{name}_failures": a["probe"]["failures"]})
        if name != "calm":
            summary[f"{name}_target_met"] = p99 is not None and p99 < target_s
    return summary


def run_config(args, index: Path, n_images: int, big_size: list[int]) -> dict:
    return {"index": str(index), "images": n_images, "requests": args.requests,
            "concurrency": args.concurrency, "k": args.k, "quick": args.quick,
            "clip_steps": None if args.index else args.clip_steps, "size": None if args.index else args.size,
            "big_uploads": args.big_uploads, "big_concurrency": args.big_concurrency,
            "big_size": big_size, "server_src": args.server_src,
            "attacks_only": args.attacks_only, "slow_bodies": args.slow_bodies,
            "slow_body_every_s": args.slow_body_every, "slow_body_s": args.slow_body_s,
            "many_terms_connections": args.many_terms_connections, "terms": args.terms,
            "distinct_terms": args.distinct_terms,
            "many_terms_s": args.many_terms_s, "probe_workers": args.probe_workers,
            "probe_target_s": args.probe_target_s, "attacker": ATTACKER, "probe_client": PROBE_CLIENT}


def print_load(results: dict, n_images: int, startup_s: float, server_rss: float | None, out: Path) -> None:
    rows = [[name, r["requests"], r["throughput_rps"], r["latency_ms_p50"], r["latency_ms_p90"],
             r["latency_ms_p99"], r["latency_ms_max"], r["errors"]] for name, r in results.items()]
    if rows:
        say(_common.format_table(["phase", "requests", "req/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "errors"],
                                 rows))
    say(f"{n_images} images indexed; server start {startup_s:.1f} s, peak RSS {server_rss} MiB; wrote {out}")


def print_attacks(attacks: dict, summary: dict, target_s: float) -> None:
    if not attacks:
        return
    rows = [[name, a["probe"]["searches"], a["probe"]["p50_s"], a["probe"]["p99_s"], a["probe"]["max_s"],
             a["probe"]["failures"], ", ".join(f"{k}: {v}" for k, v in (a.get("attack") or {}).get(
                 "fates", (a.get("attack") or {}).get("answers", {})).items())] for name, a in attacks.items()]
    say(_common.format_table(["attack", "plain searches", "p50 s", "p99 s", "max s", "failures",
                              "attack's requests"], rows))
    missed = [name for name in attacks if summary.get(f"{name}_target_met") is False]
    say(f"plain searches' p99 under attack: {'missed' if missed else 'under'} the {target_s} s "
        f"target{' (' + ', '.join(missed) + ')' if missed else ''}")


if __name__ == "__main__":
    main()
