"""tokkit quantizers vs lucidrains' vector-quantize-pytorch: forward+backward throughput and peak memory.

Each (library, case) runs in its own subprocess, so that peak memory is honest (CPU: ``ru_maxrss`` growth over a
baseline taken after the module and the input are built; CUDA: ``torch.cuda.max_memory_allocated`` growth) and a case
that cannot finish is stopped by a wall-clock and a memory cap and reported as "did not finish".

Same shapes, device, thread count and features on both sides: batch 16 (or each of ``--batch``) on a 16x16 grid,
training mode (EMA updates, entropy losses), straight-through gradients, loss = mean(codes^2) + the quantizer's
auxiliary loss. On CUDA every timed step is bracketed by ``torch.cuda.synchronize()``, and the target of every case is
to be ahead of the peer (the CPU targets are the issue's ratios).

    python benchmarks/quantizers.py [--device cpu|cuda] [--batch 16,256] [--threads 1] [--quick] [--json out.json]

Throughput is the fastest timed step (at least ``--min-steps`` steps and ``--min-time`` seconds per subprocess), and
the libraries alternate over ``--rounds`` subprocesses per case keeping each one's best, so that other processes
competing for the cores skew the ratio as little as possible.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

CASES: dict[str, dict] = {
    "vq": {"title": "VQ K=16384 dim 8 cosine EMA", "dim": 8, "target": 20.0},
    "vq1024": {"title": "VQ K=1024 dim 16 l2 EMA", "dim": 16, "target": 1.0},
    "fsq": {"title": "FSQ [8,8,8,5,5,5]", "dim": 6, "target": 1.0},
    "lfq14": {"title": "LFQ 2^14 + entropy loss", "dim": 14, "target": 100.0},
    "lfq18": {"title": "LFQ 2^18 + entropy loss", "dim": 18, "target": None},
}
LIBS = ("tokkit", "peer")
GRID = 16
LFQ18_MEMORY_TARGET_MB = 1024.0


# ----------------------------------------------------------------------------------------------------------------------
# child process: build one quantizer, time it, print one JSON line


def _build(lib: str, case: str):
    """(module, step function) for one library and case; the step runs forward + backward once."""

    dim = CASES[case]["dim"]
    if lib == "tokkit":
        from tokkit.quantizers import FSQ, LFQ, VQ

        if case == "vq":
            q = VQ(dim=dim, codebook_size=16384, cosine=True, ema=True, decay=0.99, commitment_weight=0.25)
        elif case == "vq1024":
            q = VQ(dim=dim, codebook_size=1024, cosine=False, ema=True, decay=0.99, commitment_weight=0.25)
        elif case == "fsq":
            q = FSQ(dim=dim, levels=[8, 8, 8, 5, 5, 5])
        else:
            q = LFQ(dim=dim, codebook_size=2 ** int(case[3:]), entropy_weight=0.1, commitment_weight=0.25)

        def run(x):
            out = q(x)
            return out.codes, out.loss

    else:
        import vector_quantize_pytorch as vqp

        if case in ("vq", "vq1024"):
            q = vqp.VectorQuantize(
                dim=dim, codebook_size=16384 if case == "vq" else 1024, use_cosine_sim=case == "vq", decay=0.99,
                commitment_weight=0.25, rotation_trick=False, accept_image_fmap=True,
            )  # fmt: skip

            def run(x):
                codes, _, loss = q(x)
                return codes, loss

        elif case == "fsq":
            q = vqp.FSQ(levels=[8, 8, 8, 5, 5, 5], dim=dim, channel_first=True)

            def run(x):
                codes, _ = q(x)
                return codes, codes.new_zeros(())

        else:
            q = vqp.LFQ(
                dim=dim, codebook_size=2 ** int(case[3:]), entropy_loss_weight=0.1, commitment_loss_weight=0.25,
                diversity_gamma=1.0, channel_first=True,
            )  # fmt: skip

            def run(x):
                codes, _, loss = q(x)
                return codes, loss

    q.train()
    return q, run


def _child(
    lib: str, case: str, device: str, batch: int, threads: int, min_time: float, min_steps: int, mem_cap_mb: float
) -> dict:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    q, run = _build(lib, case)
    q.to(device)
    x = torch.randn(batch, CASES[case]["dim"], GRID, GRID, device=device, requires_grad=True)
    tokens = batch * GRID * GRID

    def step() -> None:
        codes, aux = run(x)
        (codes.float().square().mean() + aux).backward()
        x.grad = None
        q.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))  # KiB
        cap = (vm + int(mem_cap_mb * 1024)) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    times: list[float] = []
    try:
        step()  # warm-up (also runs any lazy initialisation)
        sync()
        start = time.perf_counter()
        while time.perf_counter() - start < min_time or len(times) < min_steps:
            t0 = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t0)
    except (MemoryError, RuntimeError) as e:  # torch reports a failed allocation as RuntimeError
        return {"status": "did not finish", "reason": f"out of memory (cap {mem_cap_mb:.0f} MB): {str(e)[:80]}"}
    if device.startswith("cuda"):
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    # the fastest step: robust to other processes competing for the cores (the mean is kept for reference)
    return {
        "status": "ok",
        "tokens_per_s": tokens / min(times),
        "mean_tokens_per_s": tokens * len(times) / sum(times),
        "peak_mb": peak_mb,
        "steps": len(times),
    }


# ----------------------------------------------------------------------------------------------------------------------
# parent: one subprocess per (library, case), then the table


def _run_case(lib: str, case: str, batch: int, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable, __file__, "--_child", lib, case, "--device", args.device, "--batch", str(batch),
        "--threads", str(args.threads),
        "--min-time", str(args.min_time), "--min-steps", str(args.min_steps), "--mem-cap-mb", str(args.mem_cap_mb),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    repo = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.time_cap, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "did not finish", "reason": f"over the {args.time_cap:.0f} s time cap"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["killed"])[-1]
        return {"status": "did not finish", "reason": f"exit {proc.returncode}: {tail[:100]}"}
    return json.loads(lines[-1])


def _better(a: dict, b: dict) -> bool:
    return a["tokens_per_s"] > b["tokens_per_s"]


def _fmt_rate(r: dict) -> str:
    if r["status"] != "ok":
        return r["status"]
    v = r["tokens_per_s"]
    return f"{v / 1e6:.2f} M" if v >= 1e6 else f"{v / 1e3:.1f} k"


def _fmt_mem(r: dict) -> str:
    return f"{r['peak_mb']:.0f} MB" if r["status"] == "ok" else "-"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", default="16", help="comma-separated batch sizes, one table each (e.g. 16,256)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="shorter timing windows and caps (a smoke run)")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    p.add_argument("--libs", default=",".join(LIBS), help="comma-separated subset of tokkit,peer")
    p.add_argument("--min-time", type=float, default=None, help="seconds of timed steps per case")
    p.add_argument("--min-steps", type=int, default=None, help="timed steps at least, per case")
    p.add_argument("--rounds", type=int, default=None, help="subprocesses per (library, case), alternating; best kept")
    p.add_argument("--time-cap", type=float, default=None, help="wall-clock cap per (library, case) subprocess")
    p.add_argument("--mem-cap-mb", type=float, default=6000.0, help="memory cap per subprocess (CPU)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.min_time is None:
        args.min_time = 1.0 if args.quick else 5.0
    if args.min_steps is None:
        args.min_steps = 1 if args.quick else 3
    if args.rounds is None:
        args.rounds = 1 if args.quick else 2
    if args.time_cap is None:
        args.time_cap = 60.0 if args.quick else 300.0

    if args._child:
        lib, case = args._child
        batch = int(args.batch)
        r = _child(lib, case, args.device, batch, args.threads, args.min_time, args.min_steps, args.mem_cap_mb)
        print(json.dumps(r), flush=True)
        return

    from rich.console import Console

    console = Console(width=max(Console().width, 150))
    cases = [c for c in args.cases.split(",") if c]
    libs = [lib for lib in args.libs.split(",") if lib]
    batches = [int(b) for b in args.batch.split(",") if b]
    results: dict[int, dict[str, dict[str, dict]]] = {}
    for batch in batches:
        results[batch] = {}
        for case in cases:
            res = results[batch][case] = {}
            for rnd in range(args.rounds):  # alternate the libraries, keep each one's best round
                for lib in libs:
                    best = res.get(lib)
                    if best is not None and best["status"] != "ok":
                        continue  # a library that could not finish a case does not get another round of it
                    console.print(f"[dim]running {lib} {case} batch {batch} (round {rnd + 1}/{args.rounds}) ...[/dim]")
                    r = _run_case(lib, case, batch, args)
                    if best is None or r["status"] != "ok" or _better(r, best):
                        res[lib] = r

    import torch

    for batch, by_case in results.items():
        _print_table(console, batch, by_case, args, torch.__version__)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results}, indent=1))


def _print_table(
    console, batch: int, results: dict[str, dict[str, dict]], args: argparse.Namespace, version: str
) -> None:
    """One rich table of ``results`` (case -> library -> result) for one batch size."""
    from rich.table import Table

    cpu = args.device == "cpu"
    table = Table(
        title=f"quantizer forward+backward, batch {batch}, {GRID}x{GRID} grid, device {args.device}, "
        f"{args.threads} thread(s), torch {version}"
    )
    for col in ("case", "tokkit tokens/s", "peer tokens/s", "speedup", "tokkit peak", "peer peak", "target", "met"):
        table.add_column(col, justify="left" if col == "case" else "right")
    for case, res in results.items():
        t, pr = res.get("tokkit", {"status": "skipped"}), res.get("peer", {"status": "skipped"})
        ratio = t["tokens_per_s"] / pr["tokens_per_s"] if t["status"] == pr["status"] == "ok" else None
        target = CASES[case]["target"] if cpu else 1.0  # on accelerators: ahead of the peer at every case
        if case == "lfq18":
            target_s = f"< {LFQ18_MEMORY_TARGET_MB:.0f} MB"
            met = t["status"] == "ok" and t["peak_mb"] < LFQ18_MEMORY_TARGET_MB
        else:
            target_s = f">= {target:g}x" if cpu else "> 1x"
            met = ratio is not None and (ratio >= target if cpu else ratio > target)
        table.add_row(
            CASES[case]["title"], _fmt_rate(t), _fmt_rate(pr), f"{ratio:.1f}x" if ratio else "-",
            _fmt_mem(t), _fmt_mem(pr), target_s, "yes" if met else "no",
        )  # fmt: skip
    console.print(table)
    for case, res in results.items():
        for lib, r in res.items():
            if r["status"] != "ok" and "reason" in r:
                console.print(f"{lib} {case} batch {batch}: did not finish ({r['reason']})")


if __name__ == "__main__":
    main()
