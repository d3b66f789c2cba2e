"""Explicit vs fused attention on the CPU: a small, self-contained timing (docs/architecture.md).

Times one model's forward pass (eval mode, no gradients; with ``--backward`` a training forward
+ backward) on each attention path, in three numeric set-ups, all in one process:

* ``fp32``: float32 weights and inputs;
* ``bf16``: the weights and inputs cast to bfloat16 (what ``celluscan predict`` runs in bf16);
* ``bf16-autocast``: float32 weights under ``torch.autocast("cpu", torch.bfloat16)`` (what
  ``celluscan train`` runs on a CPU with native bf16).

For each set-up the explicit path (``softmax(Q K^T / sqrt(d)) V`` as separate operations) and
the fused path (``torch.nn.functional.scaled_dot_product_attention``) run on the same random
batch. Timed calls of all six variants are interleaved round-robin, so a change in machine load
hits every variant alike; each figure is the median over ``--repeats`` calls after ``--warmup``
untimed ones, both in process CPU time (steady on a shared machine; use ``--threads 1`` there)
and wall-clock time. The ratio is explicit time / fused time (> 1: fused is faster), measured
in the same run. It also prints how far the two paths' logits differ, and what share of the
forward's FLOPs the attention matmuls are (counted on the meta device, no arithmetic).

Run it niced; it takes well under a minute for the defaults::

    nice -n 19 .venv/bin/python tutorial/attention_timing.py --threads 1
    nice -n 19 .venv/bin/python tutorial/attention_timing.py --threads 1 --model vit_s_16 --image-size 224 --batch 4
    nice -n 19 .venv/bin/python tutorial/attention_timing.py --threads 1 --backward
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time

import torch

from celluscan.models import create_model

SETUPS = ("fp32", "bf16", "bf16-autocast")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def build_variants(model_name: str, image_size: int, batch: int, seed: int = 0):
    """{(setup, path): (model, input, context factory)} for every set-up and attention path."""
    torch.manual_seed(seed)
    base = create_model(model_name, image_size=image_size).eval()
    x = torch.randn(batch, 3, image_size, image_size)
    variants = {}
    for setup in SETUPS:
        for fused in (False, True):
            model = create_model(model_name, image_size=image_size).eval()
            model.load_state_dict(base.state_dict())
            model.set_fused_attn(fused)
            inputs = x
            context = contextlib.nullcontext
            if setup == "bf16":
                model = model.to(torch.bfloat16)
                inputs = x.to(torch.bfloat16)
            elif setup == "bf16-autocast":
                context = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
            variants[(setup, "fused" if fused else "explicit")] = (model, inputs, context)
    return variants


def _call(model, inputs, context, backward: bool) -> None:
    if not backward:
        with torch.inference_mode(), context():
            model(inputs)
        return
    model.zero_grad(set_to_none=True)
    with context():
        loss = model(inputs).float().logsumexp(dim=1).mean()
    loss.backward()


def time_variants(variants, warmup: int, repeats: int, backward: bool = False) -> dict:
    """Median (wall seconds, process CPU seconds) per forward for each variant, timed round-robin.

    CPU time counts the work this process did, whatever else runs on the machine, so it is the
    steadier figure on a shared machine (with one thread; with more, waiting threads may spin)."""
    wall = {key: [] for key in variants}
    cpu = {key: [] for key in variants}
    for _ in range(warmup):
        for model, inputs, context in variants.values():
            _call(model, inputs, context, backward)
    for _ in range(repeats):
        for key, (model, inputs, context) in variants.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            _call(model, inputs, context, backward)
            wall[key].append(time.perf_counter() - start)
            cpu[key].append(time.process_time() - start_cpu)
    return {key: (statistics.median(wall[key]), statistics.median(cpu[key])) for key in variants}


def attention_flop_share(model_name: str, image_size: int) -> tuple[float, float]:
    """(GFLOPs of one image's forward, share of them in the attention matmuls Q K^T and A V).

    Counted by ``torch.utils.flop_counter.FlopCounterMode`` on the explicit path, on the meta
    device (shapes only, no arithmetic): the attention matmuls are the batched ``aten.bmm``
    calls; the Linear layers are ``aten.addmm`` and the patch embedding ``aten.convolution``."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = create_model(model_name, image_size=image_size, fused_attn=False).eval()
        x = torch.empty(1, 3, image_size, image_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    total = sum(counts.values())
    return total / 1e9, counts.get("aten.bmm", 0) / total


def max_logit_difference(variants, setup: str) -> float:
    with torch.inference_mode():
        outs = []
        for path in ("explicit", "fused"):
            model, inputs, context = variants[(setup, path)]
            with context():
                outs.append(model(inputs).float())
    return float((outs[0] - outs[1]).abs().max())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_ti_16", help="registered model (default vit_ti_16)")
    parser.add_argument("--image-size", type=int, default=128, help="input side in px (default 128)")
    parser.add_argument("--batch", type=int, default=8, help="images per forward (default 8)")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per variant (default 7)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per variant (default 2)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    parser.add_argument("--backward", action="store_true",
                        help="time a training step's forward + backward instead of inference")
    args = parser.parse_args(argv)
    if min(args.batch, args.repeats, args.image_size) < 1 or args.warmup < 0:
        parser.error("--batch, --repeats and --image-size must be positive, --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)

    variants = build_variants(args.model, args.image_size, args.batch)
    config = next(iter(variants.values()))[0].config
    tokens = config.num_patches + 1
    print(f"{args.model} at {args.image_size} px: T = {tokens} tokens, {config.num_heads} heads of "
          f"d = {config.embed_dim // config.num_heads}; batch {args.batch}; "
          f"{'forward + backward' if args.backward else 'inference forward'}; "
          f"median of {args.repeats} calls after {args.warmup} warm-up, interleaved")
    print(f"CPU: {_cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    gflops, share = attention_flop_share(args.model, args.image_size)
    print(f"one image: {gflops:.2f} GFLOPs, of which the attention matmuls (Q K^T, A V) are {share:.1%}")
    if args.backward:
        for model, _inputs, _context in variants.values():
            model.train()  # dropout is 0 in every registered config, so the outputs still agree
    medians = time_variants(variants, args.warmup, args.repeats, args.backward)
    print()
    print("| set-up | explicit CPU ms | fused CPU ms | explicit / fused (CPU) | explicit / fused (wall) "
          "| max logit difference |")
    print("|---|---:|---:|---:|---:|---:|")
    for setup in SETUPS:
        (explicit_wall, explicit_cpu), (fused_wall, fused_cpu) = medians[(setup, "explicit")], medians[(setup, "fused")]
        diff = max_logit_difference(variants, setup)
        print(f"| {setup} | {explicit_cpu * 1e3:.1f} | {fused_cpu * 1e3:.1f} | {explicit_cpu / fused_cpu:.2f} | "
              f"{explicit_wall / fused_wall:.2f} | {diff:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
