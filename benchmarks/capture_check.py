"""The capturable step as one CUDA graph: does it capture, does the replay equal the eager step, what does it save.

LLaMA-3.1-8B layers' seven matrices (dimensions divided by ``--scale``), gradients fed through the fused hooks
(backward of sum(W * G)), MoFaSGD rank ``--rank``. Three optimizers on copies of the same weights:

* ``eager``: the default step (``capturable=False``);
* ``capturable``: ``capturable=True`` run eagerly (no host reads; the Jacobi core SVD);
* ``graph`` (CUDA only): the capturable optimizer's clipping and step captured once into a ``torch.cuda.CUDAGraph``
  after warm-up and replayed every step (the learning rate is constant here, so its refill is captured too).

It prints the host syncs of one eager and one capturable clip + step (``torch.cuda.set_sync_debug_mode``), the
median time of each variant, and how far the replayed weights are from the eager capturable ones after
``--steps`` steps. Without CUDA only the first two run (a check that the script and the capturable step work).

    python -m benchmarks.capture_check [--scale 16] [--layers 1] [--rank 8] [--steps 6] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import warnings

import torch

from benchmarks.harness import sync, timed
from benchmarks.llama_layer import LLAMA_8B, layer_matrix_shapes
from mofasgd import MoFaSGD


def _feed(params: list[torch.nn.Parameter], grads: list[torch.Tensor]) -> None:
    """One backward whose gradient of each W is its G (the fused hooks project it)."""
    sum((p * g).sum() for p, g in zip(params, grads)).backward()


def _syncs(fn) -> int:
    """Host-device syncs CUDA reports while `fn` runs (0 on the CPU, which has none to report)."""
    if not torch.cuda.is_available():
        fn()
        return 0
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=int, default=16, help="divide every dimension by this")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    scaled = {key: value // args.scale for key, value in LLAMA_8B.items()}
    shapes = layer_matrix_shapes(**scaled) * args.layers
    weights = [torch.randn(*s, device=device) * 0.02 for s in shapes]
    grad_sets = [[torch.randn(*s, device=device) * 1e-3 for s in shapes] for _ in range(2)]

    def build(capturable: bool) -> tuple[list[torch.nn.Parameter], MoFaSGD]:
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        return params, MoFaSGD(params, lr=1e-3, rank=args.rank, init="gradient", capturable=capturable)

    def clip_and_step(opt: MoFaSGD) -> None:
        opt.clip_grad_norm_(1.0)
        opt.step()

    runs = {"eager": build(False), "capturable": build(True)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    syncs: dict[str, int] = {}
    for step in range(args.steps):
        for name, (params, opt) in runs.items():
            _feed(params, grad_sets[step % 2])
            if step == args.steps - 1:
                syncs[name] = _syncs(lambda opt=opt: clip_and_step(opt))
            elif step:
                times[name].append(timed(lambda opt=opt: clip_and_step(opt), device))
            else:
                clip_and_step(opt)  # the first step initialises the factors
            opt.zero_grad()
    gap = max(float((p - q).detach().abs().max()) for p, q in zip(runs["eager"][0], runs["capturable"][0]))
    print(f"device {device}; {len(shapes)} matrices (8B layer / {args.scale}), rank {args.rank}, {args.steps} steps")
    for name in runs:
        median = statistics.median(times[name]) * 1e3 if times[name] else float("nan")
        print(f"{name}: clip + step {median:.2f} ms, host syncs in one clip + step: {syncs[name]}")
    print(f"capturable vs eager weights: max |diff| {gap:.2e}")
    if device.type != "cuda":
        print("graph: capture needs CUDA; not run")
        return
    graph_check(build, clip_and_step, grad_sets, args.steps, runs["capturable"][0], device)


def graph_check(build, clip_and_step, grad_sets, steps, reference, device) -> None:
    """Capture the capturable step after two eager steps, replay it, and compare with the eager capturable run."""
    params, opt = build(True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the default stream, as CUDA graphs want
        for step in range(2):
            _feed(params, grad_sets[step % 2])
            clip_and_step(opt)
            opt.zero_grad()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    _feed(params, grad_sets[0])
    try:
        with torch.cuda.graph(graph):
            clip_and_step(opt)
    except Exception as error:  # what a capture refuses is the finding
        print(f"graph: capture failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
        return
    replays = []
    for step in range(2, steps):
        if step > 2:
            _feed(params, grad_sets[step % 2])
        replays.append(timed(graph.replay, device))
        opt.intake.consumed()  # the host-side bookkeeping a replay skips
    sync(device)
    gap = max(float((p - q).abs().max()) for p, q in zip(params, reference))
    print(
        f"graph: replay {statistics.median(replays) * 1e3:.2f} ms; replayed vs eager capturable max |diff| {gap:.2e}"
    )


if __name__ == "__main__":
    main()
