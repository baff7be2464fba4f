"""The stored fixture behind "a switch that is off changes nothing": outputs of a small model with
every technique switch at its default, as computed before the switches existed.

`python tests/switches_off.py --write` recomputes and stores it; only do that for a deliberate
change of the default model, and say so in the commit. What is stored for each output tensor
(logits, loss, every gradient, the weights after three optimizer steps with Muon and Adam, every
tensor of the quantized artifact payload) is a fingerprint: its L1 mass, its sum, and its dot
product with a fixed random vector.

The model runs in float64, and Muon's Newton-Schulz iteration in float64 too: CPU kernels round
differently on different machines (vector width, AMX or not), and in float32/bfloat16 three Muon
steps turn those differences into flipped quantization levels, so digests of the outputs only
held on the machine that wrote them. In float64 the machines differ by about 1e-16; fingerprints
are compared to within TOLERANCE of the tensor's L1 mass, far below any change a switch makes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "switches_off.json"
SETTINGS = dict(
    vocab_size=64,
    num_layers=4,
    model_dim=32,
    num_heads=4,
    num_kv_heads=2,
    mlp_mult=2,
    train_seq_len=16,
    train_batch_tokens=64,
    grad_accum_steps=1,
)
TOLERANCE = 1e-9  # of a tensor's L1 mass


class FixedBatches:
    """A loader that hands out seeded random batches (BOS included, so SmearGate's reset is
    exercised)."""

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)

    def next_batch(self, local_tokens: int, seq_len: int):
        tokens = torch.randint(0, SETTINGS["vocab_size"], (local_tokens + 1,), generator=self.gen)
        tokens[::7] = tg.BOS_ID
        return tokens[:-1].reshape(-1, seq_len), tokens[1:].reshape(-1, seq_len)


def newton_schulz_fp64(g: torch.Tensor, steps: int, coefficients: tuple) -> torch.Tensor:
    """Muon's orthogonalization (tg.zeropower_via_newtonschulz5) computed in float64."""
    x = g.double() / (g.double().norm() + 1e-7)
    tall = g.size(0) > g.size(1)
    x = x.T if tall else x
    for i in range(steps):
        a, b, c = coefficients[min(i, len(coefficients) - 1)]
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def fingerprint(t: torch.Tensor) -> list[float]:
    """[L1 mass, sum, dot product with a fixed random vector], in float64."""
    flat = t.detach().reshape(-1).double()
    direction = torch.randn(
        flat.numel(), generator=torch.Generator().manual_seed(flat.numel()), dtype=torch.float64
    )
    return [flat.abs().sum().item(), flat.sum().item(), (flat @ direction).item()]


def outputs(h: tg.Hyperparameters | None = None) -> dict[str, torch.Tensor]:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    h = h or tg.Hyperparameters(**SETTINGS)
    model = tg.build_model(h, torch.device("cpu"))
    with torch.no_grad():  # the zero-initialized projections would hide every block
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.05)
    model.double()
    x, y = FixedBatches(1).next_batch(64, 16)
    model.eval()
    out = {"logits": model(x)}
    model.train()
    loss = model(x, y)
    loss.backward()
    out["loss"] = loss
    out |= {f"grads.{n}": p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    rt = tg.Runtime(0, 0, 1, torch.device("cpu"), False, None)
    optimizers = tg.build_optimizers(h, model, newton_schulz_fp64, fused=False)
    # the parts of a run's Session that a training step reads
    session = SimpleNamespace(model=model, optimizers=optimizers, h=h, rt=rt, grad_accum_steps=1)
    loader = FixedBatches(2)
    for step in range(3):
        tg.train_step(session, loader, lr_scale=1.0 - 0.2 * step, momentum=0.95)
    out |= {f"weights.{n}": p for n, p in model.state_dict().items()}
    payload = tg.quantize_state_dict(model.state_dict(), h)
    for name, entry in payload["tensors"].items():
        out |= {f"artifact.{name}.{k}": v for k, v in entry.items() if isinstance(v, torch.Tensor)}
    return out


def compute(h: tg.Hyperparameters | None = None) -> dict[str, list[float]]:
    return {key: fingerprint(t) for key, t in outputs(h).items()}


def differences(stored: dict, current: dict) -> list[str]:
    """The outputs whose fingerprints disagree beyond TOLERANCE, and the ones only one side has."""
    bad = sorted(set(stored) ^ set(current))
    for key in sorted(set(stored) & set(current)):
        mass = max(stored[key][0], current[key][0])
        if any(
            abs(a - b) > TOLERANCE * mass for a, b in zip(stored[key], current[key], strict=True)
        ):
            bad.append(key)
    return bad


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        raise SystemExit("usage: python tests/switches_off.py --write")
    FIXTURE.write_text(json.dumps(compute(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {FIXTURE}")
