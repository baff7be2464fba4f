"""Export time and artifact size of the default model, without data: quantize_state_dict + artifact_bytes.

    python bench/export_size.py            # Hyperparameters() defaults: 9x512, MLP 3x, vocab 1024, zstd-22
    MLP_MULT=2 ZSTD_LEVEL=19 python bench/export_size.py   # any setting of train_gpt.py applies

Two weight sets are exported. "init" is the model as built (the output projections start at zero, so it
compresses far better than a trained model). "dense" replaces every block matrix by a Gaussian of the
same shape (std = the layer's default init bound / sqrt(3), i.e. the same RMS as the c_q/c_k/c_v/fc init)
and the embedding by N(0, TIED_EMBED_INIT_STD): a stand-in closer to trained weights, whose int6
levels carry about as much entropy.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402


def densify(model: tg.GPT, h: tg.Hyperparameters, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            kind = tg.export_kind(name, p, h.embed_quant, [])
            if kind == "int6":
                std = 1.0 / p.shape[1] ** 0.5 / 3**0.5  # nn.Linear's U(-1/sqrt(in), 1/sqrt(in)) has this RMS
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif name == "tok_emb.weight":
                p.copy_(torch.randn(p.shape, generator=g) * h.tied_embed_init_std)


def export(model: tg.GPT, h: tg.Hyperparameters) -> dict:
    state = model.state_dict()
    t0 = time.perf_counter()
    payload = tg.quantize_state_dict(state, h)
    t1 = time.perf_counter()
    blob = tg.artifact_bytes(payload, h.zstd_level)
    t2 = time.perf_counter()
    raw = len(tg.torch_save_bytes(payload))
    return {"quantize_ms": 1000 * (t1 - t0), "compress_ms": 1000 * (t2 - t1), "bytes_model": len(blob),
            "bytes_uncompressed": raw}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1337)
    args = parser.parse_args()
    h = tg.Hyperparameters.from_env(os.environ)
    torch.manual_seed(args.seed)
    model = tg.build_model(h, torch.device("cpu"))
    bytes_code = (ROOT / "train_gpt.py").stat().st_size
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model layers:{h.num_layers} dim:{h.model_dim} mlp_mult:{h.mlp_mult} vocab:{h.vocab_size} "
          f"params:{n_params} embed_quant:{h.embed_quant} zstd_level:{h.zstd_level} seed:{args.seed} "
          f"torch_threads:{torch.get_num_threads()} overrides:{h.overrides() or '-'}")
    for label in ("init", "dense"):
        if label == "dense":
            densify(model, h, args.seed)
        r = export(model, h)
        total = r["bytes_model"] + bytes_code
        print(f"{label}: quantize:{r['quantize_ms']:.0f}ms zstd-{h.zstd_level}:{r['compress_ms']:.0f}ms "
              f"export:{r['quantize_ms'] + r['compress_ms']:.0f}ms uncompressed:{r['bytes_uncompressed']} "
              f"bytes_model:{r['bytes_model']} bytes_code:{bytes_code} bytes_total:{total} "
              f"bits_per_param:{8 * r['bytes_model'] / n_params:.3f} "
              f"fits_16mb:{str(total <= tg.SIZE_LIMIT_BYTES).lower()} margin:{tg.SIZE_LIMIT_BYTES - total}")


if __name__ == "__main__":
    main()
