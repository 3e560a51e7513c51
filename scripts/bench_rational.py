"""Benchmark GroupRational (GR-KAN) against GELU: activation, ViT MLP block, KAT vs ViT training step.

Issue 4 "Performance". Every comparison is measured side by side in one run: candidates are interleaved
(rotating order each round), each sample times ``--inner`` back-to-back calls between device syncs, and the
median sample is reported.

1. Activation on ``(128, 197, 3072)`` in bfloat16 and float32: forward and forward+backward time of
   ``F.gelu`` and of ``GroupRational`` (8 groups) per implementation, with the achieved bandwidth
   (minimal traffic: forward reads x and writes y = 2 N bytes-per-element; backward also reads x and
   grad_y and writes dx = 3 N more) next to the measured copy bandwidth (``dst.copy_(src)``, 2 N).
2. ViT-B MLP block (768 -> 3072 -> 768 on 128 x 197 tokens), forward+backward under bfloat16 autocast:
   fc1-GELU-fc2 vs GR(identity)-fc1-GR(gelu)-fc2.
3. Training step (forward, backward, AdamW step, bfloat16 autocast) of ``kat_small_patch16_224`` vs
   ``vit_small_patch16_224`` at batch 128.

``--small`` shrinks everything to run on a CPU in a couple of minutes (activation (4, 64, 768), MLP 192 ->
768 on 4 x 64 tokens, tiny models at batch 2). Usage::

    python scripts/bench_rational.py                 # on a GPU machine
    python scripts/bench_rational.py --small         # anywhere
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lightning_act.nn.group_rational import GroupRational, triton_available

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def synchronizer(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def measure(candidates: dict[str, Callable[[], object]], rounds: int, inner: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call of each candidate, interleaved round by round."""
    sync = synchronizer(device)
    for run in candidates.values():
        run()
        run()
    sync()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    names = list(candidates)
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            run = candidates[name]
            sync()
            start = time.perf_counter()
            for _ in range(inner):
                run()
            sync()
            samples[name].append((time.perf_counter() - start) / inner)
    return {name: statistics.median(values) for name, values in samples.items()}


def implementations(device: torch.device) -> tuple[list[str], dict[str, str]]:
    """Implementations to benchmark on ``device`` and the reasons for those left out."""
    chosen = ["reference", "compile"]
    skipped = {}
    if device.type == "cuda" and triton_available():
        chosen.append("triton")
    else:
        skipped["triton"] = "needs a CUDA device with triton (the CPU interpreter is for testing only)"
    return chosen, skipped


def check_against_reference(module: GroupRational, x: torch.Tensor, implementation: str) -> float:
    with torch.no_grad():
        module.implementation = "reference"
        expected = module(x).float()
        module.implementation = implementation
        return float((module(x).float() - expected).abs().max())


def bench_activation(args: argparse.Namespace, device: torch.device, names: list[str]) -> None:
    shape = (4, 64, 768) if args.small else (128, 197, 3072)
    print(f"\n## Activation {shape}, 8 groups (median of {args.rounds} rounds x {args.inner} calls)")
    print("| dtype | op | fwd ms | fwd GB/s | fwd % copy | fwd+bwd ms | fwd+bwd GB/s | fwd+bwd % copy | fwd+bwd / GELU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dtype_name in DTYPES:
        bench_activation_dtype(args, device, names, shape, dtype_name)


def bench_activation_dtype(
    args: argparse.Namespace, device: torch.device, names: list[str], shape: tuple[int, ...], dtype_name: str
) -> None:
    """One dtype's rows of the activation table."""
    dtype = DTYPES[dtype_name]
    numel = math.prod(shape)
    element_bytes = torch.finfo(dtype).bits // 8
    x = torch.randn(shape, device=device, dtype=dtype)
    grad_y = torch.randn_like(x)
    copy_target = torch.empty_like(x)
    x_grad = x.detach().requires_grad_()
    modules = {name: GroupRational(shape[-1], 8, "gelu", implementation=name).to(device) for name in names}
    for name, module in modules.items():
        print(f"<!-- {dtype_name} {name}: max |y - reference| = {check_against_reference(module, x, name):.2e} -->")

    def forward(op: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return op(x)

        return run

    def forward_backward(op: Callable[[torch.Tensor], torch.Tensor], params: list[torch.Tensor]) -> Callable[[], object]:
        def run() -> object:
            return torch.autograd.grad(op(x_grad), [x_grad, *params], grad_y)

        return run

    forward_runs: dict[str, Callable[[], object]] = {"copy": lambda: copy_target.copy_(x), "gelu": forward(F.gelu)}
    backward_runs: dict[str, Callable[[], object]] = {"gelu": forward_backward(F.gelu, [])}
    for name, module in modules.items():
        forward_runs[f"rational[{name}]"] = forward(module)
        backward_runs[f"rational[{name}]"] = forward_backward(module, list(module.parameters()))
    forward_times = measure(forward_runs, args.rounds, args.inner, device)
    backward_times = measure(backward_runs, args.rounds, args.inner, device)
    copy_bandwidth = 2 * numel * element_bytes / forward_times["copy"]
    print(f"| {dtype_name} | copy | {forward_times['copy'] * 1e3:.3f} | {copy_bandwidth / 1e9:.2f} | 100% | | | | |")
    for name in backward_runs:
        forward_bandwidth = 2 * numel * element_bytes / forward_times[name]
        backward_bandwidth = 5 * numel * element_bytes / backward_times[name]
        print(
            f"| {dtype_name} | {name} | {forward_times[name] * 1e3:.3f} | {forward_bandwidth / 1e9:.2f} | "
            f"{100 * forward_bandwidth / copy_bandwidth:.0f}% | {backward_times[name] * 1e3:.3f} | "
            f"{backward_bandwidth / 1e9:.2f} | {100 * backward_bandwidth / copy_bandwidth:.0f}% | "
            f"{backward_times[name] / backward_times['gelu']:.2f}x |"
        )


class KANMLP(nn.Module):
    """GR-KAN MLP of KAT (Yang & Wang 2024): GR(identity) -> fc1 -> GR(gelu) -> fc2."""

    def __init__(self, dim: int, hidden: int, implementation: str) -> None:
        super().__init__()
        self.act1 = GroupRational(dim, 8, "identity", implementation=implementation)
        self.fc1 = nn.Linear(dim, hidden)
        self.act2 = GroupRational(hidden, 8, "gelu", implementation=implementation)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act2(self.fc1(self.act1(x))))


def bench_mlp_block(args: argparse.Namespace, device: torch.device, names: list[str]) -> None:
    batch, tokens, dim = (4, 64, 192) if args.small else (128, 197, 768)
    hidden = 4 * dim
    print(f"\n## MLP block {dim} -> {hidden} -> {dim} on ({batch}, {tokens}) tokens, fwd+bwd, bf16 autocast")
    x = torch.randn(batch, tokens, dim, device=device, requires_grad=True)
    gelu_mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)).to(device)
    blocks: dict[str, nn.Module] = {"gelu": gelu_mlp}
    blocks.update({f"gr-kan[{name}]": KANMLP(dim, hidden, name).to(device) for name in names})

    def step(block: nn.Module) -> Callable[[], object]:
        def run() -> object:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                out = block(x)
            out.float().square().mean().backward()
            return out

        return run

    times = measure({name: step(block) for name, block in blocks.items()}, args.rounds, args.inner, device)
    print("| block | ms | / GELU |")
    print("|---|---|---|")
    for name, seconds in times.items():
        print(f"| {name} | {seconds * 1e3:.3f} | {seconds / times['gelu']:.2f}x |")


def bench_training_step(args: argparse.Namespace, device: torch.device, names: list[str]) -> None:
    import timm

    try:
        import lightning_act.models.kat  # noqa: F401  (registers the kat_* models with timm)
    except ImportError as error:
        print(f"\n## Training step: skipped, lightning_act.models.kat not importable ({error})")
        return
    size = "tiny" if args.small else "small"
    batch = 2 if args.small else 128
    print(f"\n## Training step kat_{size} vs vit_{size} (patch16_224), batch {batch}, bf16 autocast, AdamW")
    images = torch.randn(batch, 3, 224, 224, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)

    def step(model: nn.Module, optimizer: torch.optim.Optimizer, implementation: str | None) -> Callable[[], object]:
        def run() -> object:
            if implementation is not None:
                for module in model.modules():
                    if isinstance(module, GroupRational):
                        module.implementation = implementation
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = F.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
            return loss

        return run

    vit = timm.create_model(f"vit_{size}_patch16_224").to(device)
    kat = timm.create_model(f"kat_{size}_patch16_224").to(device)
    candidates = {f"vit_{size}": step(vit, torch.optim.AdamW(vit.parameters()), None)}
    kat_optimizer = torch.optim.AdamW(kat.parameters())
    for name in names:
        candidates[f"kat_{size}[{name}]"] = step(kat, kat_optimizer, name)
    rounds = max(3, args.rounds // 2)
    times = measure(candidates, rounds, 1 if args.small else args.inner, device)
    print("| model | ms / step | / ViT |")
    print("|---|---|---|")
    for name, seconds in times.items():
        print(f"| {name} | {seconds * 1e3:.1f} | {seconds / times[f'vit_{size}']:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="small shapes for a CPU run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 20, --small 5)")
    parser.add_argument("--inner", type=int, default=None, help="calls per timed sample (default 10, --small 2)")
    parser.add_argument("--sections", default="activation,mlp,step", help="comma list of activation,mlp,step")
    args = parser.parse_args()
    args.rounds = args.rounds or (5 if args.small else 20)
    args.inner = args.inner or (2 if args.small else 10)
    device = torch.device(args.device)
    names, skipped = implementations(device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    print(f"# bench_rational: {' '.join(sys.argv)}")
    print(f"device {device} ({device_name}), {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"triton {triton_version}, python {platform.python_version()}")
    print(f"implementations: {', '.join(names)}; skipped: {skipped or 'none'}")
    sections = set(args.sections.split(","))
    if "activation" in sections:
        bench_activation(args, device, names)
    if "mlp" in sections:
        bench_mlp_block(args, device, names)
    if "step" in sections:
        bench_training_step(args, device, names)


if __name__ == "__main__":
    main()
