"""The stored fixture behind "a switch that is off changes nothing": outputs of a small model with every
technique switch at its default, as computed before the switches existed.

`python tests/switches_off.py --write` recomputes and stores it; only do that for a deliberate change of the
default model, and say so in the commit. The test compares bit for bit: logits, loss, gradients, the weights
after three optimizer steps (Muon and Adam), and the quantized artifact payload.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "switches_off.json"
SETTINGS = dict(vocab_size=64, num_layers=4, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=2,
                train_seq_len=16, train_batch_tokens=64, grad_accum_steps=1)


class FixedBatches:
    """A loader that hands out seeded random batches (BOS included, so SmearGate's reset is exercised)."""

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)

    def next_batch(self, local_tokens: int, seq_len: int):
        tokens = torch.randint(0, SETTINGS["vocab_size"], (local_tokens + 1,), generator=self.gen)
        tokens[::7] = tg.BOS_ID
        return tokens[:-1].reshape(-1, seq_len), tokens[1:].reshape(-1, seq_len)


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().cpu().numpy().tobytes()).hexdigest()


def compute(h: tg.Hyperparameters | None = None) -> dict:
    torch.set_num_threads(1)  # a CPU matmul's rounding can depend on how it is split across threads
    torch.manual_seed(0)
    h = h or tg.Hyperparameters(**SETTINGS)
    model = tg.build_model(h, torch.device("cpu"))
    with torch.no_grad():  # the zero-initialized projections would hide every block
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.05)
    x, y = FixedBatches(1).next_batch(64, 16)
    model.eval()
    logits = model(x)
    model.train()
    loss = model(x, y)
    loss.backward()
    grads = {n: digest(p.grad) for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    rt = tg.Runtime(0, 0, 1, torch.device("cpu"), False, None)
    optimizers = tg.build_optimizers(h, model, tg.zeropower_via_newtonschulz5, fused=False)
    loader = FixedBatches(2)
    for step in range(3):
        tg.train_step(model=model, loader=loader, optimizers=optimizers, base_model=model, h=h, rt=rt,
                      grad_accum_steps=1, lr_scale=1.0 - 0.2 * step, momentum=0.95)
    payload = tg.quantize_state_dict(model.state_dict(), h)
    stored = {name: {k: digest(v) for k, v in entry.items() if isinstance(v, torch.Tensor)}
              for name, entry in payload["tensors"].items()}
    return {"logits": digest(logits), "loss": digest(loss), "grads": grads,
            "weights": {n: digest(p) for n, p in model.state_dict().items()}, "artifact": stored}


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        raise SystemExit("usage: python tests/switches_off.py --write")
    FIXTURE.write_text(json.dumps(compute(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {FIXTURE}")
