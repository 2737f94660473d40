"""Where a grouped step's GPU time can go: each cifar10 host block's convolution, timed alone.

Forward and backward, in the forms K runs' convolutions can take, as CUDA graph replays (no launch gaps):

- grouped: Conv2d(K c_in, K c_out, groups=K), what esper.tolaria.grouped trains (contiguous, channels_last)
- block-diagonal: a dense Conv2d(K c_in, K c_out) whose weight is zero off the K diagonal blocks (K times
  the arithmetic, on the dense kernels' faster path)
- shared, batch K B: one Conv2d(c_in, c_out) over all K runs' images, as if the runs shared weights: the
  same arithmetic as grouped in the most-used kernel form, a floor for the grouped form
- one run: Conv2d(c_in, c_out) over one run's batch of B, times K (K runs one after another, no gaps)
and, beside, the block's BatchNorm, ReLU and max-pool over the K runs' channels (the memory-bound rest).
Each form's figure is the median of `--repeats` timings of 50 replays of its forward and backward (the
input's gradient too, except block 0's: images need none). With --cudnn-benchmark, cuDNN times its
algorithms for each shape first (torch.backends.cudnn.benchmark).

    python bench/grouped_convs.py --device cuda [--k 8] [--cudnn-benchmark]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn

from esper.kasmina.hosts import HOSTS
from esper.transport.config import at_least

from growth_overhead import checked_device


def replay_ms(fn, repeats: int) -> float:
    """Median ms of one call of fn, from `repeats` timings of 50 replays of fn captured as a CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(50):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 50)
    return statistics.median(times)


def forward_backward(layer: nn.Module, x: torch.Tensor, input_grad: bool):
    """fn: layer's forward on x and its backward from a fixed random upstream gradient."""
    x = x.requires_grad_(input_grad)
    upstream = torch.randn_like(layer(x))
    wrt = [*layer.parameters()] + ([x] if input_grad else [])

    def fn():
        torch.autograd.grad(layer(x), wrt, upstream)
    return fn


def block_diagonal(conv: nn.Conv2d, k: int) -> nn.Conv2d:
    """A dense conv with `conv`'s grouped weight on its diagonal blocks and zeros elsewhere."""
    dense = nn.Conv2d(conv.in_channels, conv.out_channels, 3, padding=1, bias=False).to(conv.weight.device)
    with torch.no_grad():
        dense.weight.zero_()
        c_out, c_in = conv.out_channels // k, conv.in_channels // k
        for j in range(k):
            dense.weight[j * c_out:(j + 1) * c_out, j * c_in:(j + 1) * c_in] = conv.weight[j * c_out:(j + 1) * c_out]
    return dense


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--k", type=at_least(1), default=8)
    parser.add_argument("--batch-size", type=at_least(1), default=128)
    parser.add_argument("--repeats", type=at_least(1), default=5)
    parser.add_argument("--cudnn-benchmark", action="store_true")
    args = parser.parse_args()
    if not args.device.startswith("cuda"):
        parser.error("this benchmark times CUDA graph replays: --device cuda")
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    device, k, b = checked_device(parser, args.device), args.k, args.batch_size
    spec = HOSTS["cifar10"]
    print(f"# grouped convolutions on {torch.cuda.get_device_name(device)}, torch {torch.__version__}, K = {k}, "
          f"batch {b}, forward + backward, ms (median of {args.repeats} x 50 graph replays)"
          + (", cuDNN benchmark mode" if args.cudnn_benchmark else ""))
    forms = ["grouped", "grouped CL", "block-diag", "block-diag CL", "shared KB", "one run xK", "BN+ReLU+pool"]
    print(f"{'block':<16}" + "".join(f"{f:>14}" for f in forms))
    totals = [0.0] * len(forms)
    widths = (spec.in_channels, *spec.channels)
    size = 32
    torch.manual_seed(0)
    for i, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:])):
        input_grad = i > 0
        grouped = nn.Conv2d(k * c_in, k * c_out, 3, padding=1, bias=False, groups=k).to(device)
        x = torch.randn(b, k * c_in, size, size, device=device)
        single = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False).to(device)
        rest = nn.Sequential(nn.BatchNorm2d(k * c_out), nn.ReLU(), nn.MaxPool2d(2)).to(device)
        cl = torch.channels_last
        fns = [
            forward_backward(grouped, x.clone(), input_grad),
            forward_backward(nn.Conv2d(k * c_in, k * c_out, 3, padding=1, bias=False, groups=k)
                             .to(device, memory_format=cl), x.clone(memory_format=cl), input_grad),
            forward_backward(block_diagonal(grouped, k), x.clone(), input_grad),
            forward_backward(block_diagonal(grouped, k).to(memory_format=cl), x.clone(memory_format=cl), input_grad),
            forward_backward(single, torch.randn(k * b, c_in, size, size, device=device), input_grad),
            forward_backward(single, torch.randn(b, c_in, size, size, device=device), input_grad),
            forward_backward(rest, torch.randn(b, k * c_out, size, size, device=device), True),
        ]
        times = [replay_ms(fn, args.repeats) for fn in fns]
        times[5] *= k  # K runs one after another
        totals = [t + u for t, u in zip(totals, times)]
        print(f"{f'{c_in}->{c_out} @{size}':<16}" + "".join(f"{t:>14.3f}" for t in times))
        size //= 2
    print(f"{'all blocks':<16}" + "".join(f"{t:>14.3f}" for t in totals))


if __name__ == "__main__":
    main()
