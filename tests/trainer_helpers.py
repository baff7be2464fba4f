"""Helpers of tests/test_trainer.py that spawned processes import: they must live in a module."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import train_gpt

# Tall, wide and square matrices: more of them than ranks, so every rank orthogonalizes several.
MUON_SHAPES = [(32, 16), (16, 32), (24, 24), (48, 8), (8, 48), (16, 16)]
MUON_STEPS = 3


def muon_trajectory() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Parameters before and after MUON_STEPS steps on seeded gradients; alike in every process."""
    gen = torch.Generator().manual_seed(1234)
    params = [nn.Parameter(torch.randn(*shape, generator=gen)) for shape in MUON_SHAPES]
    before = [p.detach().clone() for p in params]
    opt = train_gpt.Muon([{"params": params}], lr=0.05, momentum=0.95, backend_steps=5)
    for _ in range(MUON_STEPS):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return before, [p.detach().clone() for p in params]


def muon_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    """One rank of a gloo group: the same Muon steps, the result saved as rank{rank}.pt."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        _, after = muon_trajectory()
        torch.save(after, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
