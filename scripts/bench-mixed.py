#!/usr/bin/env python3
"""Co-scheduling figures, measured through the real daemon (release build; `make models` first).

On one GPU, with SmolLM2 (8 parallel sequences) and an SDXL model loaded together:
  1. inter-token latency (p50, p99) of one chat stream alone and while an image renders;
  2. time to first token of chats alone and of chats that arrive at points of renders, beside
     the longest image chunk the daemon logged in those renders;
  3. image time alone and under a steady chat (and the chat's share of the device time);
  4. aggregate tokens/s at 1, 2, 4 and 8 concurrent streams of the one model.
Token times are taken as each `--json` line reaches this script. It prints figures and asserts
nothing.

  scripts/bench-mixed.py [--sdxl DIR] [--size PX] [--steps N] [--tokens N]

--sdxl defaults to the tiny random SDXL fixture (daemon/tests/fixtures/diffusion/tiny-sdxl); give
a real SDXL folder or checkpoint on a real GPU.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")
SMOL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
TINY = os.path.join(ROOT, "daemon", "tests", "fixtures", "diffusion", "tiny-sdxl")


def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, int(round(p / 100 * (len(xs) - 1)))))
    return xs[k]


class Daemon:
    def __init__(self, work, sdxl):
        cfg = os.path.join(work, "halod.toml")
        kind = "sdxl"
        with open(cfg, "w") as f:
            f.write(
                f'[[models]]\nname = "smol"\nkind = "llm"\npath = {json.dumps(SMOL)}\n'
                f"context = 512\nparallel = 8\n"
                f'[[models]]\nname = "img"\nkind = "{kind}"\npath = {json.dumps(sdxl)}\n'
            )
        self.env = dict(os.environ, HALO_ADDR=f"unix:{work}/halod.sock")
        # Every piece of GPU work is logged (JSON lines) with its wall time: the image chunks'
        # lengths come from there.
        self.log = os.path.join(work, "halod.log")
        self.proc = subprocess.Popen(
            [os.path.join(BIN, "halod"), "--config", cfg, "--listen", f"unix:{work}/halod.sock"],
            env=dict(self.env, HALO_LOG="warn,halod::executor=trace", HALO_LOG_FORMAT="json"),
            stderr=open(self.log, "w"),
        )
        for _ in range(200):
            if self.halo("status", check=False).returncode == 0:
                break
            time.sleep(0.1)
        self.halo("load", "smol")
        self.halo("load", "img")

    def halo(self, *args, check=True):
        return subprocess.run(
            [os.path.join(BIN, "halo"), *args], env=self.env, capture_output=True, check=check
        )

    def spawn(self, *args):
        return subprocess.Popen(
            [os.path.join(BIN, "halo"), *args], env=self.env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True
        )

    def image_chunks_ms(self):
        """Wall time of every image chunk logged so far, in ms."""
        out = []
        with open(self.log) as f:
            for line in f:
                try:
                    j = json.loads(line)
                except ValueError:
                    continue
                fields = j.get("fields", {})
                if fields.get("message") == "ran a piece of GPU work" and fields.get("image"):
                    out.append(fields["wall_us"] / 1000)
        return out

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


COUNT = [0]


def chat(d, prompt, tokens, out):
    """Runs one greedy chat; appends {start, first, times} to `out`. Each prompt starts with its
    own number, so no chat reuses another's cached prompt (only the chat template's start)."""
    COUNT[0] += 1
    prompt = f"{COUNT[0]}. {prompt}"
    start = time.monotonic()
    p = d.spawn("generate", "smol", prompt, "--chat", "--temperature", "0", "--max-tokens", str(tokens),
                "--json")
    times = []
    for line in p.stdout:
        j = json.loads(line)
        if j.get("done"):
            break
        times.append(time.monotonic())
    p.wait()
    if not times:
        sys.exit(f"the chat gave no tokens: {p.stderr.read().strip()}")
    out.append({"start": start, "first": times[0] - start if times else None, "times": times})


def gaps(times):
    return [(b - a) * 1000 for a, b in zip(times, times[1:])]


def image(d, size, steps, seed=1):
    t = time.monotonic()
    out = os.path.join(tempfile.gettempdir(), "halo-bench-mixed.png")
    d.halo("image", "img", "a lighthouse at dusk", "--width", str(size), "--height", str(size),
           "--steps", str(steps), "--seed", str(seed), "-o", out)
    return time.monotonic() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sdxl", default=TINY)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--samples", type=int, default=5, help="first-token samples each way")
    a = ap.parse_args()
    for b in ("halod", "halo"):
        if not os.access(os.path.join(BIN, b), os.X_OK):
            sys.exit("build first: cargo build --release")
    with tempfile.TemporaryDirectory() as work:
        d = Daemon(work, a.sdxl)
        try:
            run(d, a)
        finally:
            d.stop()


def run(d, a):
    prompt = "Write a short story about a lighthouse keeper."
    # Warm up: pipelines compiled, piece costs learned.
    chat(d, prompt, 4, [])
    image(d, a.size, 2)

    alone = []
    for _ in range(2):
        chat(d, prompt, a.tokens, alone)
    itl_alone = [g for r in alone for g in gaps(r["times"])]
    img_alone = min(image(d, a.size, a.steps) for _ in range(2))

    # Time to first token: short chats alone, then as many arriving at different points of
    # renders (a chat starts, gets its first token and ends while the image renders on).
    firsts = []
    for _ in range(a.samples):
        chat(d, prompt, 2, firsts)
    ttft_alone = [r["first"] * 1000 for r in firsts]
    chunks_before = len(d.image_chunks_ms())
    ttft_render = []
    for k in range(a.samples):
        got = []
        th = threading.Thread(target=image, args=(d, a.size, a.steps, 10 + k))
        th.start()
        # Arrive after the text encoders, somewhere in the denoising.
        time.sleep(img_alone * (0.2 + 0.6 * k / max(1, a.samples - 1)))
        if th.is_alive():
            chat(d, prompt, 2, got)
            ttft_render.append(got[0]["first"] * 1000)
        th.join()
    chunks = d.image_chunks_ms()[chunks_before:]
    longest = max(chunks) if chunks else float("nan")

    # A chat that arrives during a render, then another right after the first ends.
    during = []
    img_t = {}

    def render():
        img_t["start"] = time.monotonic()
        img_t["took"] = image(d, a.size, a.steps, seed=2)
        img_t["end"] = time.monotonic()

    th = threading.Thread(target=render)
    th.start()
    time.sleep(min(1.0, img_alone / 4))
    while th.is_alive() and len(during) < 2:
        chat(d, prompt, a.tokens, during)
    th.join()
    # Only the gaps between two tokens that both came while the image rendered.
    itl_render = [
        (b - x) * 1000
        for r in during
        for x, b in zip(r["times"], r["times"][1:])
        if img_t["start"] <= x and b <= img_t["end"]
    ]

    # Image time under a steady chat: chats back to back for as long as the image renders.
    steady = []
    busy = threading.Event()

    def chats():
        while not busy.is_set():
            chat(d, prompt, 16, steady)

    tc = threading.Thread(target=chats)
    tc.start()
    time.sleep(0.5)
    s0 = time.monotonic()
    img_steady = image(d, a.size, a.steps, seed=3)
    s1 = time.monotonic()
    busy.set()
    tc.join()
    # The chat's device time during the render, from its steps alone: a decode step per token
    # it got then, and a prompt's time alone for each first token.
    steps = sum(1 for r in steady for t in r["times"][1:] if s0 <= t <= s1)
    prompts = sum(1 for r in steady if r["times"] and s0 <= r["times"][0] <= s1)
    chat_secs = steps * pct(itl_alone, 50) / 1000 + prompts * statistics.median(ttft_alone) / 1000

    print(f"device: {json.loads(d.halo('status', '--json').stdout).get('device', {}).get('name')}")
    print(f"image: {a.sdxl} at {a.size}x{a.size}, {a.steps} steps; chat: {a.tokens} tokens, greedy")
    print()
    print(f"{'figure':<44} {'alone':>10} {'beside':>10} {'ratio':>7}")

    def row(name, x, y):
        print(f"{name:<44} {x:>10.1f} {y:>10.1f} {y / x if x else float('nan'):>7.2f}")

    print(f"{'  (token gaps measured during the render)':<44} {len(itl_render):>10}")
    row("inter-token latency p50 (ms), during render", pct(itl_alone, 50), pct(itl_render, 50))
    row("inter-token latency p99 (ms), during render", pct(itl_alone, 99), pct(itl_render, 99))
    print(f"{'  (first tokens alone, during renders)':<44} {len(ttft_alone):>10} {len(ttft_render):>10}")
    row("time to first token p50 (ms), in render", pct(ttft_alone, 50), pct(ttft_render, 50))
    row("time to first token max (ms), in render", max(ttft_alone), max(ttft_render or [0]))
    print(f"{'  image chunks in those renders: median, max':<44} {pct(chunks, 50):>10.1f}"
          f" {longest:>10.1f}")
    bound = pct(ttft_alone, 50) + longest
    print(f"{'  p50 alone + the longest chunk (ms)':<44} {bound:>10.1f}"
          f" {pct(ttft_render, 50):>10.1f} {pct(ttft_render, 50) / bound:>7.2f}")
    row("image time (s), under a steady chat", img_alone, img_steady)
    bound = img_alone + chat_secs
    print(f"{'  alone + the chat steps device time (s)':<44} {bound:>10.1f} {img_steady:>10.1f}"
          f" {img_steady / bound:>7.2f}")
    print(f"{'  (chat prompts, decode steps in the render)':<44} {prompts:>4} {steps:>5}")
    print()
    print(f"{'streams':<10} {'tokens/s':>10} {'vs 1':>7}")
    base = None
    for n in (1, 2, 4, 8):
        runs = []
        ts = [threading.Thread(target=chat, args=(d, prompt, a.tokens, runs))
              for i in range(n)]
        t = time.monotonic()
        for x in ts:
            x.start()
        for x in ts:
            x.join()
        wall = time.monotonic() - t
        tps = sum(len(r["times"]) for r in runs) / wall
        base = base or tps
        print(f"{n:<10} {tps:>10.1f} {tps / base:>7.2f}")


if __name__ == "__main__":
    main()
