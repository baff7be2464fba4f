"""Export time and artifact size of a model, without data: quantize_state_dict + artifact_bytes.

    python bench/export_size.py  # Hyperparameters() defaults: 9x512, MLP 3x, vocab 1024, zstd-22
    MLP_MULT=2 ZSTD_LEVEL=19 python bench/export_size.py  # any setting of train_gpt.py applies
    VOCAB_SIZE=8192 MLP_MULT=4 python bench/export_size.py --embed-quant all  # which format fits?
    python bench/export_size.py --code packed/train_gpt.py  # count the packed file's bytes as code
    python bench/export_size.py --table  # the dense stand-in: method x clip x bits x compressor
    PRESET=frontier python bench/export_size.py --compressors  # one set of levels, every codec
    PRESET=frontier BITS=auto python bench/export_size.py  # the widths BITS=auto chooses
    python bench/export_size.py --packing [--weights RAW.pt]  # streams vs one torch.save record

Two weight sets are exported. "init" is the model as built (the output projections start at zero, so
it compresses far better than a trained model). "dense" replaces every block matrix by a Gaussian of
the same shape (std = the layer's default init bound / sqrt(3), i.e. the same RMS as the
c_q/c_k/c_v/fc init) and the embedding by N(0, TIED_EMBED_INIT_STD): a stand-in closer to trained
weights, whose int6 levels carry about as much entropy.

With --embed-quant all, each weight set is exported once per embedding format that train_gpt.py
accepts (EMBED_QUANT), and once without the embedding: what the rest of the model takes, and so how
many bits a value the embedding may spend at most. The last lines say which formats fit, or what is
missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402

EMBED_NAME = "tok_emb.weight"
# Embedding formats this project has (fp16, int8) or that the SP8192 records used (int7, int6);
# --embed-quant all keeps those that train_gpt.py accepts.
EMBED_QUANT_FORMATS = ("fp16", "int8", "int7", "int6")


def densify(model: tg.GPT, h: tg.Hyperparameters, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            kind = tg.export_kind(name, p, h)
            if kind.startswith("int") and name != EMBED_NAME:
                # nn.Linear's U(-1/sqrt(in), 1/sqrt(in)) has this RMS
                std = 1.0 / p.shape[1] ** 0.5 / 3**0.5
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif name == EMBED_NAME:
                p.copy_(torch.randn(p.shape, generator=g) * h.tied_embed_init_std)


def export(
    state: dict, h: tg.Hyperparameters, hessians: dict | None = None, bytes_code: int = 0
) -> dict:
    """Quantize and compress; with BITS=auto, the widths that fit beside `bytes_code` (their
    decisions printed; its compressions counted as compression time)."""
    t0 = time.perf_counter()
    if h.bits == "auto":
        budget = tg.SIZE_LIMIT_BYTES - bytes_code
        payload, blob, compress_s = tg.fit_bits(state, h, hessians or {}, budget, print)
        t2 = time.perf_counter()
        t1 = t2 - compress_s
    else:
        payload = tg.quantize_state_dict(state, h, hessians)
        t1 = time.perf_counter()
        blob = tg.artifact_bytes(payload, h.zstd_level, h.compressor)
        t2 = time.perf_counter()
    raw = len(tg.torch_save_bytes(payload))
    return {
        "quantize_ms": 1000 * (t1 - t0),
        "compress_ms": 1000 * (t2 - t1),
        "bytes_model": len(blob),
        "bytes_uncompressed": raw,
    }


def accepted_embed_quants(h: tg.Hyperparameters) -> list[str]:
    accepted = []
    for fmt in EMBED_QUANT_FORMATS:
        try:
            dataclasses.replace(h, embed_quant=fmt).validate()
        except ValueError:
            continue
        accepted.append(fmt)
    return accepted


def verdict(
    label: str, totals: dict[str, int], rest_total: int, embed_values: int, missing: list[str]
) -> str:
    """Which embedding formats fit, or how few bits a value the embedding would need."""
    fitting = [fmt for fmt, total in totals.items() if total <= tg.SIZE_LIMIT_BYTES]
    room = tg.SIZE_LIMIT_BYTES - rest_total
    bits = 8 * room / embed_values
    if fitting:
        return (
            f"{label}: fits with embed_quant {', '.join(fitting)}; the embedding may take "
            f"{bits:.2f} bits a value"
        )
    unavailable = f" ({', '.join(missing)} not in train_gpt.py yet)" if missing else ""
    if room <= 0:
        return (
            f"{label}: fits with no embedding format{unavailable}: the rest of the model alone is "
            f"{-room} bytes over; it needs fewer bits a weight in the blocks or fewer parameters"
        )
    return (
        f"{label}: fits with none of {', '.join(totals)}{unavailable}: the embedding may take "
        f"{bits:.2f} bits a value after compression"
    )


TABLE_ROWS = [
    (method, clip)
    for method, clip in (
        ("rtn", "percentile"),
        ("rtn", "sdclip"),
        ("rtn", "search"),
        ("gptq", "sdclip"),
    )
]


def calibration_hessians(model: tg.GPT, h: tg.Hyperparameters, data_path: Path) -> dict:
    """GPTQ's Hessians of the stand-in on real text: the offline dataset's training shards."""
    tokenizer = (
        data_path.parent.parent
        / "tokenizers"
        / f"{data_path.name.split('_sp')[0]}_{h.vocab_size}_bpe.model"
    )
    hc = dataclasses.replace(h, data_path=str(data_path), tokenizer_path=str(tokenizer))
    return tg.collect_hessians(
        model, hc, tg.Runtime(0, 0, 1, torch.device("cpu"), False, None), grad_accum_steps=8
    )


def table(model: tg.GPT, h: tg.Hyperparameters, bytes_code: int, data_path: Path) -> None:
    """Markdown rows: bytes of the dense stand-in for each method x clip x MLP bits x compressor."""
    state = model.state_dict()
    hessians = None
    if data_path.is_dir():
        t0 = time.perf_counter()
        hessians = calibration_hessians(model, h, data_path)
        print(
            f"gptq calibration on {data_path.name}: {h.gptq_calib_tokens} tokens, "
            f"{time.perf_counter() - t0:.1f}s",
            flush=True,
        )
    print(
        "| method | clip | MLP bits | compressor | quantize s | compress s | model bytes "
        "| total bytes | fits |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for method, clip in TABLE_ROWS:
        if method == "gptq" and hessians is None:
            print(f"| gptq | {clip} | - | - | - | - | no calibration data at {data_path} | - | - |")
            continue
        for bits in (6, 5):
            for compressor in ("zstd", "lzma"):
                hh = dataclasses.replace(
                    h, quant_method=method, clip=clip, mlp_bits=bits, compressor=compressor
                )
                r = export(state, hh, hessians if method == "gptq" else None)
                total = r["bytes_model"] + bytes_code
                print(
                    f"| {method} | {clip} | {bits} | {compressor} "
                    f"| {r['quantize_ms'] / 1000:.1f} | {r['compress_ms'] / 1000:.1f} "
                    f"| {r['bytes_model']:,} | {total:,} "
                    f"| {'yes' if total <= tg.SIZE_LIMIT_BYTES else 'NO'} |",
                    flush=True,
                )


def compressor_table(state: dict, h: tg.Hyperparameters, bytes_code: int) -> None:
    """Markdown rows: the same levels (quantized once) stored with each COMPRESSOR."""
    t0 = time.perf_counter()
    payload = tg.quantize_state_dict(state, h)
    print(f"quantized once: {time.perf_counter() - t0:.1f}s ({h.quant_method}, {h.clip})")
    print(
        "| compressor | streams | codecs chosen | compress s | model bytes | total bytes | fits |"
    )
    print("|---|---|---|---|---|---|---|")
    for compressor in (*tg.CODECS, "auto"):
        t0 = time.perf_counter()
        blob = tg.artifact_bytes(payload, h.zstd_level, compressor)
        seconds = time.perf_counter() - t0
        codecs = [c for c, _ in tg.stream_table(blob[len(tg.ARTIFACT_MAGIC) :])]
        chosen = ", ".join(f"{c} {codecs.count(c)}" for c in tg.CODECS if c in codecs)
        total = len(blob) + bytes_code
        fits = "yes" if total <= tg.SIZE_LIMIT_BYTES else "NO"
        print(
            f"| {compressor} | {len(codecs)} | {chosen} | {seconds:.1f} | {len(blob):,} "
            f"| {total:,} | {fits} |",
            flush=True,
        )


def packing_row(label: str, state: dict, h: tg.Hyperparameters) -> None:
    """One markdown row: the artifact's streams (COMPRESSOR=auto) against the same payload as one
    torch.save record of tensors, compressed whole with each codec."""
    payload = tg.quantize_state_dict(state, h)
    ours = len(tg.artifact_bytes(payload, h.zstd_level, "auto"))
    plain = tg.torch_save_bytes(payload)
    sizes = {c: len(tg.compress(plain, c, h.zstd_level)) for c in tg.CODECS}
    best = min(sizes.values())
    cells = " | ".join(f"{sizes[c]:,}" for c in tg.CODECS)
    print(f"| {label} | {ours:,} | {cells} | {100 * (ours / best - 1):+.1f} % |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument(
        "--embed-quant",
        help="comma-separated EMBED_QUANT formats to export, or 'all' "
        "(every format train_gpt.py accepts); default: the EMBED_QUANT setting",
    )
    parser.add_argument(
        "--code",
        type=Path,
        default=ROOT / "train_gpt.py",
        help="the file whose size counts as the code (default: train_gpt.py)",
    )
    parser.add_argument(
        "--table",
        action="store_true",
        help="the dense stand-in only, for each quantization "
        "method x clip x MLP bits x compressor (GPTQ calibrates on --data-path)",
    )
    parser.add_argument(
        "--compressors",
        action="store_true",
        help="the dense stand-in only, quantized once and stored with each COMPRESSOR",
    )
    parser.add_argument(
        "--packing",
        action="store_true",
        help="the artifact's streams against one torch.save record, on the init and dense weights "
        "(or on --weights)",
    )
    parser.add_argument(
        "--weights", type=Path, help="with --packing: a raw checkpoint (*_raw.pt) to measure on"
    )
    parser.add_argument(
        "--data-path",
        type=Path,
        default=ROOT / "data" / "datasets" / "pydocs_sp1024",
        help="training shards that calibrate GPTQ for --table (default: the offline dataset)",
    )
    args = parser.parse_args()
    try:
        h = tg.Hyperparameters.from_env(os.environ)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if not args.code.is_file():
        sys.exit(f"error: --code {args.code}: no such file")
    accepted = accepted_embed_quants(h)
    if args.embed_quant in (None, "all"):
        formats = accepted if args.embed_quant == "all" else [h.embed_quant]
    else:
        formats = [f.strip() for f in args.embed_quant.split(",") if f.strip()]
        refused = [f for f in formats if f not in accepted]
        if refused:
            sys.exit(
                f"error: --embed-quant {','.join(refused)}: train_gpt.py accepts EMBED_QUANT "
                f"{', '.join(accepted)}"
            )
    missing = [f for f in EMBED_QUANT_FORMATS if f not in accepted]
    torch.manual_seed(args.seed)
    model = tg.build_model(h, torch.device("cpu"))
    bytes_code = args.code.stat().st_size
    n_params = sum(p.numel() for p in model.parameters())
    embed_values = model.state_dict()[EMBED_NAME].numel()
    print(
        f"model layers:{h.num_layers} dim:{h.model_dim} mlp_mult:{h.mlp_mult} vocab:{h.vocab_size} "
        f"params:{n_params} embed_values:{embed_values} zstd_level:{h.zstd_level} seed:{args.seed} "
        f"torch_threads:{torch.get_num_threads()} overrides:{h.overrides() or '-'} "
        f"code:{args.code.name} bytes_code:{bytes_code} embed_quant_accepted:{','.join(accepted)}"
    )
    if args.packing:
        print(
            "| weights | streams, auto | torch.save + zstd | + lzma | + brotli | streams vs best |"
        )
        print("|---|---|---|---|---|---|")
        if args.weights:
            state = torch.load(args.weights, map_location="cpu", weights_only=True)
            packing_row(args.weights.name, state, h)
            return
        packing_row("init", model.state_dict(), h)
        densify(model, h, args.seed)
        packing_row("dense stand-in", model.state_dict(), h)
        return
    if args.table or args.compressors:
        densify(model, h, args.seed)
        if args.compressors:
            compressor_table(model.state_dict(), h, bytes_code)
        else:
            table(model, h, bytes_code, args.data_path)
        return
    verdicts = []
    for label in ("init", "dense"):
        if label == "dense":
            densify(model, h, args.seed)
        state = model.state_dict()
        totals = {}
        for fmt in formats:
            r = export(state, dataclasses.replace(h, embed_quant=fmt), bytes_code=bytes_code)
            totals[fmt] = total = r["bytes_model"] + bytes_code
            print(
                f"{label}: embed_quant:{fmt} quantize:{r['quantize_ms']:.0f}ms "
                f"{h.compressor}:{r['compress_ms']:.0f}ms "
                f"export:{r['quantize_ms'] + r['compress_ms']:.0f}ms "
                f"uncompressed:{r['bytes_uncompressed']} bytes_model:{r['bytes_model']} "
                f"bytes_code:{bytes_code} bytes_total:{total} "
                f"bits_per_param:{8 * r['bytes_model'] / n_params:.3f} "
                f"fits_16mb:{str(total <= tg.SIZE_LIMIT_BYTES).lower()} "
                f"margin:{tg.SIZE_LIMIT_BYTES - total}",
                flush=True,
            )
        if args.embed_quant == "all":
            rest = export({k: v for k, v in state.items() if k != EMBED_NAME}, h)
            rest_total = rest["bytes_model"] + bytes_code
            print(
                f"{label}: without the embedding: bytes_model:{rest['bytes_model']} "
                f"bytes_total:{rest_total} room_for_embedding:{tg.SIZE_LIMIT_BYTES - rest_total}",
                flush=True,
            )
            verdicts.append(verdict(label, totals, rest_total, embed_values, missing))
    for line in verdicts:
        print(line)


if __name__ == "__main__":
    main()
