"""Training and sampling speed of one rank against the hardware limit: fp32 eager, bf16,
bf16 + torch.compile (default or CUDA-graph mode, and channels_last), through the real `LocalTrainer` and
`Diffusion.sample`. One prepared script for a GPU node (or the CPU, smaller).

For each variant it reports images/s and the achieved FLOP/s as a fraction of the
device's peak for that precision. FLOPs per image are counted once with
`torch.utils.flop_counter` (forward + backward of the UNet at the batch used; about
2.6 GFLOP per Fashion-MNIST training image for the paper model); the peak is taken
from --peak-tflops or a table of known devices (printed, so you can check it).
Sampling: DDIM-`--ddim-steps` images/s for `--samples` images in batches; then training
images/s again, after sampling (as a job's rounds after an evaluation).

    python bench/speed.py --device cuda                      # H100: paper UNet, batch 128
    python bench/speed.py --device cpu --batch 16 --steps 5 --samples 32   # this laptop
    python bench/speed.py --fedmpi-src /tmp/old --variants fp32   # an older checkout's code

`--fedmpi-src DIR` imports fedmpi from DIR (e.g. `git worktree add /tmp/old a45e1b2`), so
a baseline is measured by the same script in the same run (fp32 eager only where that
code has no `set_speed`).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import _common as C

# dense peak TFLOP/s by (device name fragment, precision); H100 SXM figures (no sparsity)
PEAKS = {
    ("H100", "fp32"): 67.0,
    ("H100", "tf32"): 495.0,
    ("H100", "bf16"): 989.0,
    ("H200", "fp32"): 67.0,
    ("H200", "tf32"): 495.0,
    ("H200", "bf16"): 989.0,
    ("A100", "fp32"): 19.5,
    ("A100", "tf32"): 156.0,
    ("A100", "bf16"): 312.0,
}


def peak_tflops(device: torch.device, precision: str, override) -> tuple[float, str]:
    if override:
        return override, "given with --peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        key = "tf32" if precision == "fp32" and torch.backends.cuda.matmul.allow_tf32 else precision
        for (frag, prec), value in PEAKS.items():
            if frag in name and prec == key:
                return value, f"{name}, {key} dense (table in bench/speed.py)"
        return float("nan"), f"{name}: unknown, give --peak-tflops"
    return float("nan"), "CPU: give --peak-tflops for a fraction"


def flops_per_image(model, diffusion, images, batch, device) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x0 = torch.from_numpy(images[:batch]).to(device).float().div(127.5).sub(1)
    with FlopCounterMode(display=False) as counter:
        diffusion.loss(model, x0).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


def profile_steps(trainer, variant: str, steps: int = 3) -> None:
    """Print the top CUDA kernels of `steps` training steps and the GPU's busy share."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        trainer.run(seed=3, steps=steps)
    wall_us = 1e6 * (time.perf_counter() - t0)
    # the device's own events (kernels, copies) only: an operator's device time repeats
    # the kernels it launched
    dev = [
        (getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)), e)
        for e in prof.key_averages()
        if e.device_type == DeviceType.CUDA
    ]
    busy = sum(us for us, _ in dev)
    print(
        f"# profile {variant}: GPU busy {busy / 1e3:.1f} ms of {wall_us / 1e3:.1f} ms wall "
        f"({busy / wall_us:.0%}) over {steps} steps; top kernels (ms, calls):"
    )
    for us, e in sorted(dev, key=lambda x: -x[0])[:12]:
        print(f"#   {us / 1e3:8.2f} {e.count:6d}  {e.key[:110]}")
    sys.stdout.flush()


def measure(variant, args, cfg, device, diffusion, images, channels, size, flops) -> list:
    """One variant's training and sampling speed: its row of the table."""
    import fedmpi
    from fedmpi.model.unet import build_unet
    from fedmpi.train.trainer import LocalTrainer

    precision = "bf16" if "bf16" in variant else "fp16" if "fp16" in variant else "fp32"
    torch.manual_seed(0)
    model = build_unet(cfg.model, channels, size).to(device)
    t = LocalTrainer(model, diffusion, images, args.batch, cfg.train.lr, device)
    tokens = variant.split("+")
    if hasattr(t, "set_speed"):
        speed = [
            precision,
            "compile" in tokens or "graphs" in tokens,
            args.channels_last or "cl" in tokens,
        ]
        if "graphs" in tokens:  # torch.compile in CUDA-graph mode (older code: no such mode)
            speed.append("reduce-overhead")
        t.set_speed(*speed)
    elif variant != "fp32":
        raise SystemExit(f"{fedmpi.__file__}: this fedmpi has fp32 eager only, not {variant}")
    torch.backends.cuda.matmul.allow_tf32 = "tf32" in tokens
    t.new_optimizer()
    t.run(seed=1, steps=3)  # warm-up (and compilation)
    res = t.run(seed=2, steps=args.steps)
    ips = res["images_per_s"]
    peak, why = peak_tflops(device, precision, args.peak_tflops)
    achieved = ips * flops / 1e12
    # sampling with the trained weights, same precision / compilation
    net = getattr(t, "net", t.model)
    net.eval()
    gen = torch.Generator(device=device).manual_seed(0)
    sample_batch = args.sample_batch or cfg.eval.batch_size
    autocast = t.autocast() if hasattr(t, "autocast") else contextlib.nullcontext()
    with torch.no_grad(), autocast:  # warm-up (and the sampling graph's compilation)
        t0 = time.perf_counter()
        diffusion.sample(
            net,
            (min(sample_batch, args.samples), channels, size, size),
            device,
            "ddim",
            2,
            generator=gen,
        )
        warm_s = time.perf_counter() - t0
    n, done, t0 = args.samples, 0, time.perf_counter()
    with torch.no_grad(), autocast:
        while done < n:
            b = min(sample_batch, n - done)
            diffusion.sample(
                net, (b, channels, size, size), device, "ddim", args.ddim_steps, generator=gen
            )
            done += b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    sample_ips = n / (time.perf_counter() - t0)
    net.train()
    # training again, as a job's rounds after an evaluation (CUDA graphs: the samplers
    # mark graph steps, after which torch tells training steps apart only by marks)
    after = t.run(seed=4, steps=args.steps)["images_per_s"]
    print(
        f"{variant}: {ips:.0f} img/s train, {sample_ips:.1f} img/s DDIM-{args.ddim_steps} "
        f"(batch {sample_batch}; sampling warm-up {warm_s:.1f} s); {after:.0f} img/s "
        f"training after sampling",
        flush=True,
    )
    return t, [
        variant,
        f"{ips:.0f}",
        f"{achieved:.2f}",
        f"{achieved / peak:.1%}" if np.isfinite(peak) else "-",
        why,
        f"{sample_ips:.1f}",
        f"{after:.0f}",
    ]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/speed.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/paper/fmnist_full.yaml")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=50, help="timed optimizer steps per variant")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--ddim-steps", type=int, default=100)
    p.add_argument(
        "--variants",
        default="fp32,fp32+cl,bf16,bf16+compile,bf16+cl+compile",
        help="comma-separated; each joins with + a precision (fp32 | bf16 | fp16), "
        "'compile' (train.compile), 'graphs' (train.compile with "
        "train.compile_mode: reduce-overhead, CUDA graphs), 'cl' "
        "(train.channels_last) and 'tf32' (TF32 tensor cores for float32 "
        "matrix products)",
    )
    p.add_argument("--channels-last", action="store_true", help="add 'cl' to every variant")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument(
        "--profile",
        action="store_true",
        help="per variant: the top CUDA kernels of 3 training steps (torch.profiler) "
        "and the GPU's busy share of those steps",
    )
    p.add_argument(
        "--sample-batch",
        type=int,
        default=None,
        help="images per sampling call (default: the config's eval.batch_size)",
    )
    p.add_argument(
        "--fedmpi-src",
        default=None,
        help="import fedmpi from this checkout instead (a baseline's code)",
    )
    return p


def _all_variants(args, cfg, device, diffusion, images, channels, size, flops):
    """(table rows, trainers by variant): every variant measured, a failing one noted."""
    rows, trainers = [], {}
    for variant in args.variants.split(","):
        try:
            trainers[variant], row = measure(
                variant, args, cfg, device, diffusion, images, channels, size, flops
            )
            rows.append(row)
        except Exception as e:  # one failing variant must not cost the others' figures
            print(f"{variant}: FAILED {type(e).__name__}: {str(e)[:400]}", flush=True)
            rows.append([variant, "failed", "-", "-", "-", "-", "-"])
    return rows, trainers


def _print_table(args, rows: list) -> None:
    print()
    print(
        C.markdown_table(
            [
                "variant",
                "train img/s",
                "TFLOP/s",
                "of peak",
                "peak assumed",
                f"DDIM-{args.ddim_steps} img/s",
                "train img/s after sampling",
            ],
            rows,
        ),
        flush=True,
    )


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.fedmpi_src:
        sys.path.insert(0, str(Path(args.fedmpi_src).resolve()))

    from fedmpi.config import load_config
    from fedmpi.data import load_arrays
    from fedmpi.model.diffusion import Diffusion
    from fedmpi.model.summary import model_shape
    from fedmpi.model.unet import build_unet
    from fedmpi.runtime import pick_device

    cfg = load_config(args.config)
    device = pick_device(args.device)
    images, _ = load_arrays(cfg.data, "train")
    images = images[: max(args.batch * 4, 512)]
    channels, size = model_shape(cfg)
    diffusion = Diffusion.from_config(cfg.diffusion)
    C.print_environment("bench/speed.py", C.environment(1, "-", device))
    torch.manual_seed(0)
    flops = flops_per_image(
        build_unet(cfg.model, channels, size).to(device),
        diffusion,
        images,
        min(args.batch, len(images)),
        device,
    )
    import fedmpi

    print(f"# fedmpi from {Path(fedmpi.__file__).resolve().parent}", flush=True)
    print(
        f"# {args.config}: {flops / 1e9:.2f} GFLOP per training image (fwd + bwd), batch "
        f"{args.batch}",
        flush=True,
    )
    rows, trainers = _all_variants(args, cfg, device, diffusion, images, channels, size, flops)
    _print_table(args, rows)
    # profiles after every timing: the profiler leaves hooks that slow a later
    # launch-bound (eager) variant of the same process
    if args.profile and device.type == "cuda":
        for variant, t in trainers.items():
            try:
                profile_steps(t, variant)
            except Exception as e:  # a profile is extra: keep the other profiles
                print(f"# profile {variant}: failed ({type(e).__name__}: {str(e)[:200]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
