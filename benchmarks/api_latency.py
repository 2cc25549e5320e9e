"""Start-up time and per-request latency of `vlmtune api` on the tiny model, on a CPU.

The reference (LLaMA-Factory's API on these machines): ready in about 8 s, 0.11 s per image request.

    python benchmarks/api_latency.py [--requests 20] [--image_size 448] [--max_tokens 8] [--threads 2]

Builds the tiny Qwen2.5-VL in a temporary directory, starts `vlmtune api` as a user would (a
subprocess, fresh Python), and prints:

- start-up: from process start to the first 200 from `GET /v1/models` (imports + model load + bind);
- latency of `POST /v1/chat/completions` with one PNG image as a base64 data: URL (client-side wall
  time over a kept-alive connection, after one warm-up request), median and 90th percentile, in
  score mode (label probabilities, the answer is a label), generate mode (greedy, `max_tokens`), and
  generate mode with the label probabilities too (the default when the server has `--labels`).

Run it on a quiet machine: other processes on the cores distort CPU timings a lot.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def image_data_url(size: int) -> str:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--image_size", type=int, default=448, help="square test image side (448 → 256 image tokens)")
    parser.add_argument("--max_tokens", type=int, default=8, help="generate mode: new tokens per answer")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import httpx

    from vlmtune.model.tiny import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(Path(tmp) / "tiny")
        port = free_port()
        base = f"http://127.0.0.1:{port}/v1"
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), VLMTUNE_API_KEY="bench")
        headers = {"Authorization": "Bearer bench"}
        log = open(Path(tmp) / "api.log", "w")
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "vlmtune", "api", "--model_name_or_path", str(model_dir),
                                 "--labels", "满足要求,不满足要求", "--port", str(port), "--log_level", "warning"],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            with httpx.Client(timeout=120) as client:
                while True:
                    if proc.poll() is not None:
                        raise SystemExit(f"vlmtune api exited:\n{(Path(tmp) / 'api.log').read_text()}")
                    try:
                        if client.get(f"{base}/models", headers=headers).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    time.sleep(0.05)
                startup = time.perf_counter() - start

                url = image_data_url(args.image_size)
                body = {"model": "tiny", "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                 {"type": "text", "text": "判断以上图片是否满足要求:\n1. 画面中只允许出现立方体。"}]}]}
                results = {}
                for mode, extra in (("score", {"vlmtune_mode": "score"}),
                                    ("generate", {"vlmtune_mode": "generate", "max_tokens": args.max_tokens,
                                                  "vlmtune_scores": False}),
                                    ("generate+scores", {"vlmtune_mode": "generate", "max_tokens": args.max_tokens})):
                    request = {**body, **extra}
                    first = client.post(f"{base}/chat/completions", json=request, headers=headers)  # warm-up
                    first.raise_for_status()
                    times = []
                    for _ in range(args.requests):
                        t0 = time.perf_counter()
                        response = client.post(f"{base}/chat/completions", json=request, headers=headers)
                        times.append(time.perf_counter() - t0)
                        response.raise_for_status()
                    usage = first.json()["usage"]
                    results[mode] = (statistics.median(times), sorted(times)[int(0.9 * (len(times) - 1))], usage)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            log.close()

    print(f"vlmtune api on the tiny model ({args.threads} torch threads, {args.image_size}×{args.image_size} PNG "
          f"as a data: URL, {args.requests} requests per mode)")
    print(f"start-up (process start → GET /v1/models 200): {startup:.2f} s")
    for mode, (median, p90, usage) in results.items():
        print(f"{mode:15s} request: median {median * 1000:.0f} ms, p90 {p90 * 1000:.0f} ms "
              f"({usage['prompt_tokens']} prompt tokens, {usage['completion_tokens']} completion tokens)")


if __name__ == "__main__":
    main()
