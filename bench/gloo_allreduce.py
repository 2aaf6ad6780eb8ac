#!/usr/bin/env python3
"""PyTorch gloo reference for the collectives table in the README (not part of the tests).

A 64 MiB f32 all_reduce, 5 warm-up and 20 timed iterations, bus bandwidth by nccl-tests' formula
(algbw x 2(n-1)/n), timed as `strata-bench comm` times its own. Start the ranks with strata's launcher,
which sets torchrun's variables:

    strata launch --nproc-per-node 4 -- python3 bench/gloo_allreduce.py
"""

import time

import torch
import torch.distributed as dist

NBYTES = 64 << 20


def main():
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    x = torch.rand(NBYTES // 4)
    for _ in range(5):
        dist.all_reduce(x)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(20):
        dist.all_reduce(x)
    dist.barrier()
    seconds = (time.perf_counter() - start) / 20
    if rank == 0:
        algbw = NBYTES / seconds / 1e9
        print(f"gloo all_reduce n={world} bytes={NBYTES} algbw {algbw:.2f} busbw "
              f"{algbw * 2 * (world - 1) / world:.2f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
