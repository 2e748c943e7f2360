"""Model-only throughput with the model in P processes of T torch threads each.

`segbatch bench`'s model-only case runs one process with torch's default threads. With segbatch's
CPU default for light models (one actor per core, one thread each) the fair ceiling is the same
layout without Ray: P copies of `forward + argmax` side by side. This prints images/s for both.

    .venv/bin/python scripts/model_only_processes.py --processes 2 --threads 1
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time


def worker(model: str, threads: int, count: int, start: mp.Barrier, out: mp.Queue) -> None:  # type: ignore[type-arg]
    import torch

    from segbatch.config import ModelConfig, PreprocessConfig
    from segbatch.logits import argmax_classes
    from segbatch.models import build_net, resolve_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    info = resolve_model(ModelConfig(name=model, weights="none"), PreprocessConfig())
    net = build_net(info).eval()
    x = torch.rand(1, 3, 520, 693)
    with torch.inference_mode():
        net(x)  # warm-up
        start.wait()
        began = time.perf_counter()
        for _ in range(count):
            out_ = net(x)
            logits = out_["out"] if isinstance(out_, dict) else out_
            argmax_classes(logits[0])
        out.put(count / (time.perf_counter() - began))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="lraspp_mobilenet_v3_large")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--count", type=int, default=20)
    args = p.parse_args()
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(args.processes), ctx.Queue()
    procs = [
        ctx.Process(target=worker, args=(args.model, args.threads, args.count, start, out))
        for _ in range(args.processes)
    ]
    for proc in procs:
        proc.start()
    rates = [out.get() for _ in procs]
    for proc in procs:
        proc.join()
    print(
        f"{args.model}: {args.processes} process(es) x {args.threads} thread(s): "
        f"{sum(rates):.2f} images/s in all ({', '.join(f'{r:.2f}' for r in rates)})"
    )


if __name__ == "__main__":
    main()
