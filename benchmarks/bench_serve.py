"""`retrain serve` under load on loopback: throughput, latency, overload behaviour, memory.

Run: python benchmarks/bench_serve.py [MODEL] [--image PHOTO] [--clients 8] [--seconds 15]

Without MODEL, trains one on ../shared/datasets/hymenoptera/train (features cached). Prints:
  1. raw ONNX Runtime throughput of the same model.onnx on pre-decoded input (batch 1 and 16),
     and decode + infer in-process (what a server must do per request, minus HTTP);
  2. single-image POST /predict from one client (unloaded latency), then from --clients
     closed-loop keep-alive clients, with batching off (--max-batch 1) and on (the default):
     requests/s, p50/p99, errors, and served / raw throughput. The ratio comes from paired
     windows (raw batch-1 ORT in this process, then the served load, three times), so both
     sides see the same background load on a shared machine;
  3. the default server at 4x the clients, three rounds of clients that retry at once on 503
     (the worst case), then one round of clients that wait Retry-After as the web page does:
     503 counts (each checked for Retry-After), p50/p99 of the answered requests, and the
     server's RSS before, at peak and after each round.
The client runs on the same cores as the server, so served figures include its cost.
Every request goes to 127.0.0.1 and every loop stops after --seconds.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from retrain.decode import load_image
from retrain.prediction import load

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hymenoptera"
BOUNDARY = "benchboundary"


def trained_model(workdir: Path) -> Path:
    from retrain.api import TrainConfig, train
    from retrain.head import HeadConfig

    if not (SHARED / "train").is_dir():
        sys.exit(f"give a MODEL directory, or put the hymenoptera dataset at {SHARED}")
    print("Training a model on hymenoptera/train (give MODEL to skip) ...", file=sys.stderr)
    return train(SHARED / "train", TrainConfig(quiet=True, head=HeadConfig(steps=300))).save(workdir / "model")


def default_photo() -> Path:
    photos = sorted((SHARED / "val").rglob("*.jpg"))
    if not photos:
        sys.exit("give --image PHOTO (no hymenoptera photos found)")
    return photos[0]


def rate(fn, seconds: float, per_call: int) -> float:
    """Calls of `fn` per second (times `per_call`) over `seconds`, after one warm-up call."""
    fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += per_call
    return n / (time.perf_counter() - start)


def raw_onnxruntime(model: Path, photo: bytes, seconds: float) -> dict:
    clf = load(model)
    image = load_image(photo, clf.prep)[None]
    sixteen = np.repeat(image, 16, axis=0)
    return {"batch1": rate(lambda: clf.probabilities(image), seconds, 1),
            "batch16": rate(lambda: clf.probabilities(sixteen), seconds, 16),
            "decode_and_infer": rate(lambda: clf.probabilities(load_image(photo, clf.prep)[None]), seconds, 1),
            "size": clf.prep.size}


def multipart(photo: bytes, name: str) -> bytes:
    head = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
            "Content-Type: image/jpeg\r\n\r\n").encode()
    return head + photo + f"\r\n--{BOUNDARY}--\r\n".encode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int, *flags: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "retrain", "serve", str(model), "--port", str(port), *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    sys.exit("the server did not start")


def load_average() -> str:
    """1-minute load average: on a shared machine, other work skews every figure here."""
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Sampler(threading.Thread):
    """The server's RSS every 0.25 s while a load runs."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.values, self.stop = pid, [], threading.Event()

    def run(self):
        while not self.stop.wait(0.25):
            self.values.append(rss_mb(self.pid))


def client(port: int, body: bytes, until: float, out: list, polite: bool) -> None:
    """One closed-loop keep-alive client: (status, seconds, has Retry-After) per request.

    A polite client sleeps Retry-After seconds after a 503 (never past `until`).
    """
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    while time.perf_counter() < until:
        start = time.perf_counter()
        try:
            conn.request("POST", "/predict?top_k=5", body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            retry_after = response.getheader("Retry-After")
            out.append((response.status, time.perf_counter() - start, retry_after is not None))
            if polite and response.status == 503:
                time.sleep(max(0.0, min(float(retry_after or 1), until - time.perf_counter())))
        except OSError as e:
            out.append((type(e).__name__, time.perf_counter() - start, False))
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)


def load_test(port: int, pid: int, body: bytes, clients: int, seconds: float, polite: bool = False) -> dict:
    """`clients` closed-loop clients for `seconds`: summary of statuses, latency and server RSS."""
    results: list = []
    sampler = Sampler(pid)
    before = rss_mb(pid)
    sampler.start()
    until = time.perf_counter() + seconds
    threads = [threading.Thread(target=client, args=(port, body, until, results, polite)) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    sampler.stop.set()
    sampler.join()
    return summarize(results, wall) | {"clients": clients, "rss_before_mb": before,
                                       "rss_peak_mb": max(sampler.values, default=before), "rss_after_mb": rss_mb(pid)}


def summarize(results: list, wall: float) -> dict:
    ok = np.array([s for status, s, _ in results if status == 200]) * 1000
    statuses = Counter(status for status, _, _ in results)
    return {"results": results, "wall": wall, "ok_per_s": len(ok) / wall,
            "p50_ms": float(np.percentile(ok, 50)) if len(ok) else float("nan"),
            "p99_ms": float(np.percentile(ok, 99)) if len(ok) else float("nan"), "statuses": dict(statuses),
            "errors": sum(n for status, n in statuses.items() if status != 200),
            "busy_with_retry_after": sum(1 for status, _, ra in results if status == 503 and ra)}


def paired(port: int, pid: int, body: bytes, clients: int, seconds: float, raw_batch1) -> dict:
    """Served load and raw batch-1 ORT in alternating windows; the served summary plus `raw` over them."""
    results, wall, raw, rss = [], 0.0, [], []
    for _ in range(3):
        raw.append(rate(raw_batch1, seconds / 4, 1))
        window = load_test(port, pid, body, clients, seconds / 3)
        results += window["results"]
        wall += window["wall"]
        rss += [window["rss_before_mb"], window["rss_peak_mb"]]
    return summarize(results, wall) | {"raw": float(np.mean(raw)), "rss_before_mb": rss[0], "rss_peak_mb": max(rss)}


def served(model: Path, body: bytes, phases: list, flags: tuple[str, ...] = ()) -> tuple[list[dict], dict]:
    """Start a server, warm it up, run each phase(port, pid) in turn; their results and /metrics."""
    port = free_port()
    proc = start_server(model, port, *flags)
    try:
        load_test(port, proc.pid, body, 4, 2)  # warm-up: allocator arenas, ORT buffers
        results = [phase(port, proc.pid) for phase in phases]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/metrics")
        metrics = json.loads(conn.getresponse().read())
        proc.terminate()
        proc.wait(timeout=30)
        return results, metrics
    finally:
        if proc.poll() is None:
            proc.kill()


def show(label: str, r: dict, raw: float) -> None:
    print(f"  {label}: {r['ok_per_s']:.1f} req/s, p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms, "
          f"errors {r['errors']}; raw ORT batch 1 alongside {raw:.1f} img/s, served/raw {r['ok_per_s'] / raw:.2f}")


def show_overload(label: str, r: dict) -> None:
    busy = r["statuses"].get(503, 0)
    print(f"  {label}: answered {r['ok_per_s']:.1f} req/s, p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms; "
          f"503 x{busy} ({r['busy_with_retry_after']} with Retry-After), other errors {r['errors'] - busy}; "
          f"RSS {r['rss_before_mb']:.0f} -> peak {r['rss_peak_mb']:.0f} -> {r['rss_after_mb']:.0f} MB")


def report_raw(model: Path, photo: bytes):
    """Print raw ONNX Runtime figures; return a batch-1 call of the model for paired windows."""
    raw = raw_onnxruntime(model, photo, seconds=5)
    print(f"Raw ONNX Runtime, {raw['size']}x{raw['size']} input, pre-decoded: batch 1 {raw['batch1']:.1f} img/s, "
          f"batch 16 {raw['batch16']:.1f} img/s; decode + infer in-process {raw['decode_and_infer']:.1f} img/s")
    clf = load(model)
    image = load_image(photo, clf.prep)[None]
    return lambda: clf.probabilities(image)


def report_served(model: Path, body: bytes, n: int, t: float, batch1) -> None:
    print(f"POST /predict, one photo per request, {t:g} s per load:")
    (off,), _ = served(model, body, [lambda port, pid: paired(port, pid, body, n, t, batch1)], ("--max-batch", "1"))
    show(f"{n} clients, batching off (--max-batch 1)", off, off["raw"])
    phases = [lambda port, pid: load_test(port, pid, body, 1, 5),
              lambda port, pid: paired(port, pid, body, n, t, batch1)]
    phases += [lambda port, pid: load_test(port, pid, body, 4 * n, t)] * 3
    phases += [lambda port, pid: load_test(port, pid, body, 4 * n, t, polite=True)]
    (single, on, *heavy, polite), metrics = served(model, body, phases)
    print(f"  1 client, batching on: p50 {single['p50_ms']:.0f} ms, p99 {single['p99_ms']:.0f} ms, "
          f"{single['ok_per_s']:.1f} req/s, errors {single['errors']}")
    show(f"{n} clients, batching on (mean batch {metrics['predict']['mean_batch']} over the whole run)", on, on["raw"])
    print(f"  RSS at {n} clients: {on['rss_before_mb']:.0f} -> peak {on['rss_peak_mb']:.0f} MB")
    print(f"4x load: {4 * n} clients against the default queue of {metrics['predict']['queue_limit']}:")
    for i, r in enumerate(heavy, 1):
        show_overload(f"round {i}, retrying at once", r)
    show_overload("clients waiting Retry-After", polite)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?")
    ap.add_argument("--image", help="photo to send (default: the first hymenoptera validation photo)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients of the normal load")
    ap.add_argument("--seconds", type=float, default=15)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else trained_model(Path(tmp))
        photo_path = Path(args.image) if args.image else default_photo()
        photo = photo_path.read_bytes()
        with Image.open(photo_path) as im:
            print(f"Photo {photo_path.name}: {im.size[0]}x{im.size[1]} {im.format}, {len(photo) / 1024:.0f} KiB")
        print(f"Load average before: {load_average()} (on {os.cpu_count()} cores)")
        batch1 = report_raw(model, photo)
        report_served(model, multipart(photo, photo_path.name), args.clients, args.seconds, batch1)
        print(f"Load average after: {load_average()}")


if __name__ == "__main__":
    main()
