"""Sequential against batched local training of M clients on one process: client-steps
per second of the quickstart UNet (configs/quickstart.yaml's model) under the
fedmpi.model.diffusion.Diffusion loss (Huber, Min-SNR-5), batch 32 of 28x28x1.

Every client starts from the same weights and takes S steps of Adam (the quickstart's
lr, no clipping, no schedule) on its own batches: client c's images, timesteps and noise
come from one generator seeded with c, drawn in the order Diffusion.loss draws them.
- sequential: the M clients one after another, each a copy of the model with its own
  torch.optim.Adam, Diffusion.loss itself (the way a client rank trains its clients);
- batched: the M clients at once with torch.func: stack_module_state stacks their
  weights, vmap(grad_and_value(functional_call(...))) does one forward / backward over
  the client dimension per step (timesteps and noise drawn outside vmap, q_sample and
  the Min-SNR weights computed there too), and one torch.optim.Adam on the stacked
  tensors steps them all: Adam is elementwise with a step count the clients share, so
  it is each client's own Adam.
First a check that both give the same per-client weights (max |difference| and its size
against the weights' change), then steps per second for each M: a warm-up run of one
step, then the median over --repeats runs of S steps, as M * S / seconds.

vmap cannot run the UNet with channels-last activations (train.channels_last, the
quickstart's CPU layout): the probe below prints the error. So the batched form runs
NCHW; the table has the sequential form in both layouts.

    python bench/batched_clients.py                 # M = 1,2,4,8, S = 3, torch's threads
    python bench/batched_clients.py --threads 1 --clients 1,2,4 --repeats 5
    python bench/batched_clients.py --device cuda

Tables are printed and written to bench/results/batched_clients.md.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

from fedmpi.config import load_config
from fedmpi.model.diffusion import Diffusion
from fedmpi.model.summary import model_shape
from fedmpi.model.unet import build_unet

CONFIG = "configs/quickstart.yaml"


class Setup:
    """The model, its loss and lr, the batch shape, the device."""

    def __init__(self, device: torch.device, batch: int):
        cfg = load_config(C.ROOT / CONFIG)
        channels, size = model_shape(cfg)
        torch.manual_seed(0)
        self.model = build_unet(cfg.model, channels, size).to(device)
        self.diffusion = Diffusion.from_config(cfg.diffusion)
        self.lr = cfg.train.lr
        self.shape = (batch, channels, size, size)
        self.device = device

    def generator(self, client: int) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(1000 + client)

    def images(self, g: torch.Generator) -> torch.Tensor:
        """A client's batch in [-1, 1] (the timing does not depend on the pixels)."""
        return torch.rand(self.shape, generator=g, device=self.device) * 2 - 1

    def draw(self, g: torch.Generator):
        """Images, then t and noise as Diffusion.loss draws them from the same generator."""
        x0 = self.images(g)
        t = torch.randint(0, self.diffusion.T, (x0.shape[0],), generator=g, device=self.device)
        noise = torch.randn(x0.shape, generator=g, device=self.device, dtype=x0.dtype)
        return x0, t, noise


def sequential(s: Setup, m: int, steps: int, channels_last: bool = False):
    """M clients one after another; returns their models and per-step losses."""
    nets, losses = [], []
    for c in range(m):
        net = copy.deepcopy(s.model)
        net.channels_last = channels_last
        opt = torch.optim.Adam(net.parameters(), lr=s.lr)
        g = s.generator(c)
        for _ in range(steps):
            loss = s.diffusion.loss(net, s.images(g), generator=g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        nets.append(net)
    return nets, torch.stack(losses).reshape(m, steps)


def batched(s: Setup, m: int, steps: int):
    """M clients at once (torch.func.vmap); returns stacked weights and per-step losses."""
    params, buffers = stack_module_state([s.model] * m)  # copies, leaves with grad
    base = copy.deepcopy(s.model).to("meta")  # the structure functional_call runs
    base.channels_last = False
    opt = torch.optim.Adam(params.values(), lr=s.lr)
    d = s.diffusion
    fn = F.smooth_l1_loss if d.loss_type == "huber" else F.mse_loss
    weights = torch.from_numpy(d.loss_weight).to(s.device)

    def loss_one(p, b, xt, t, noise, w):
        pred = functional_call(base, (p, b), (xt, t))
        if d.weighting == "none":
            return fn(pred, noise)
        per_image = fn(pred.float(), noise, reduction="none").mean(dim=(1, 2, 3))
        return (w * per_image).mean()

    step = vmap(grad_and_value(loss_one))
    gens = [s.generator(c) for c in range(m)]
    losses = []
    for _ in range(steps):
        x0, t, noise = (torch.stack(v) for v in zip(*(s.draw(g) for g in gens)))
        xt = d.q_sample(x0.flatten(0, 1), t.flatten(), noise.flatten(0, 1)).view_as(x0)
        with torch.no_grad():  # torch.func.grad still differentiates; no outer graph
            grads, loss = step(params, buffers, xt, t, noise, weights[t].float())
        for k, p in params.items():
            p.grad = grads[k]
        opt.step()
        losses.append(loss.detach())
    return params, torch.stack(losses, dim=1)


def check(s: Setup, m: int, steps: int) -> list[str]:
    """Do both forms give each client the same weights and losses?"""
    nets, seq_loss = sequential(s, m, steps)
    params, bat_loss = batched(s, m, steps)
    start = dict(s.model.named_parameters())
    worst, change, diff = 0.0, 0.0, 0.0
    for c, net in enumerate(nets):
        for k, w in net.named_parameters():
            delta = (params[k][c].detach() - w.detach()).double()
            worst = max(worst, delta.abs().max().item())
            diff += delta.square().sum().item()
            change += (w.detach() - start[k].detach()).double().square().sum().item()
    loss_diff = (seq_loss - bat_loss).abs().max().item()
    rel = (diff / change) ** 0.5
    return [
        f"check, M={m} clients x S={steps} steps: max |w_batched - w_sequential| = {worst:.2e}, "
        f"||difference|| / ||weights' change|| = {rel:.2e}, max |loss difference| = "
        f"{loss_diff:.2e} -> {'same to float tolerance' if rel < 1e-3 else 'DIFFERENT'}"
    ]


def probe_channels_last(s: Setup) -> str:
    """What vmap says about the UNet with channels-last activations."""
    params, buffers = stack_module_state([s.model] * 2)
    base = copy.deepcopy(s.model).to("meta")
    base.channels_last = True
    x = torch.zeros((2, *s.shape), device=s.device)
    t = torch.zeros((2, s.shape[0]), dtype=torch.long, device=s.device)
    try:
        vmap(lambda p, b, x, t: functional_call(base, (p, b), (x, t)))(params, buffers, x, t)
    except Exception as e:  # the result to report, whatever it is
        return f"vmap with channels_last activations fails: {type(e).__name__}: {e}"
    return "vmap with channels_last activations works"


def rate(fn, m: int, steps: int, repeats: int, device: torch.device) -> float:
    """Client-steps per second: warm-up (one step), then the median of `repeats` runs."""

    def once(n):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn(m, n)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    once(1)
    return m * steps / C.median(once(steps) for _ in range(repeats))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="bench/batched_clients.py", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--clients", default="1,2,4,8", help="comma-separated M")
    p.add_argument("--steps", type=int, default=3, help="S: local steps per client")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--check-clients", type=int, default=3, help="M of the equality check")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: as is)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out-dir", default=str(C.RESULTS))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    C.print_environment("bench/batched_clients.py", C.environment(1, "-", device))
    s = Setup(device, args.batch)
    lines = [probe_channels_last(s), *check(s, args.check_clients, args.steps)]
    print("\n".join(lines), flush=True)
    forms = {
        "sequential NCHW": lambda m, n: sequential(s, m, n),
        "sequential NHWC": lambda m, n: sequential(s, m, n, channels_last=True),
        "batched (vmap) NCHW": lambda m, n: batched(s, m, n),
    }
    rows = []
    for m in C.int_list(args.clients):
        r = {name: rate(fn, m, args.steps, args.repeats, device) for name, fn in forms.items()}
        b = r["batched (vmap) NCHW"]
        ratios = [f"{b / r['sequential NCHW']:.2f}x", f"{b / r['sequential NHWC']:.2f}x"]
        rows.append([m, *(f"{v:.2f}" for v in r.values()), *ratios])
        print(f"  M={m}: " + ", ".join(f"{k} {v:.2f}" for k, v in r.items()), flush=True)
    head = ["M", *(f"{k} (client-steps/s)" for k in forms), "batched / seq NCHW"]
    table = C.markdown_table([*head, "batched / seq NHWC"], rows)
    title = (
        f"### Local training of M clients on one process: {device.type}, "
        f"{torch.get_num_threads()} torch threads, batch {args.batch}, S = {args.steps} "
        f"steps, median of {args.repeats}"
    )
    text = "\n".join([title, "", *lines, "", table])
    print("\n" + text)
    C.save_result(args.out_dir, "batched_clients.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
