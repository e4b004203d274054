"""Accuracy of the statistics a one-pass K/V quantization could use, against the SageAttention2++ reference.

The sm90 call reads K and V twice: once for the K mean (smoothing) and the per-channel V amax (the FP8 scale),
once to quantize. A quantizer that reads them once needs statistics it can have before it reaches every token:
- K smoothing by a *sampled* mean: any one vector subtracted from every key of a head leaves softmax exact (a
  per-row constant shift), so the mean only sets the INT8 range. Candidates: the mean of the head's first
  128-key tile, or of a strided sample of ~128 keys over the whole sequence (each quantizer block can read it).
- K smoothing per 128-key tile: each tile minus its own mean, the shift q·m_tile added back to that tile's scores
  (a per-row constant within a tile, so adding it rides on the per-row term the kernel already adds to every
  score; computing q·m_tile inside the kernel is the cost). Exact in real arithmetic, and the mean of a tile is
  known when the tile is quantized.
- V scales per 128-key tile and channel instead of per channel: each tile's P·V lands in a fresh fp32
  accumulator that is added to the running one (two-level accumulation), so the add becomes a multiply-add by
  that tile's scale.
Every variant is the reference (`sage2pp_attention_reference` pieces, CPU, fp32) with one statistic swapped,
compared with fp64 SDPA on the same inputs. Inputs: DiT-like (Q outlier channels, K with a large per-channel
offset), and a joint text+image sequence (as Flux / SD3.5 / HunyuanVideo concatenate them) whose first tokens
come from another distribution (text keys with their own offset, larger values).

    PYTHONPATH=$PWD python bench/single_pass_quant_study.py [--seq 2048] [--heads 4] [--seeds 3] [--json F]
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

from sage3_diffusers.numerics.attention_common import LOG2E, online_softmax_attention
from sage3_diffusers.numerics.formats import e4m3_round
from sage3_diffusers.numerics.fp8 import quantize_fp8_per_channel
from sage3_diffusers.numerics.int8 import k_token_groups, q_token_groups, quantize_int8_grouped
from sage3_diffusers.numerics.metrics import accuracy_metrics
from sage3_diffusers.numerics.sage2pp_reference import P_FP8_OFFSET_LOG2

TILE = 128
K_MEANS = ("full", "first_tile", "strided", "per_tile")
V_SCALES = ("per_channel", "per_tile")


def k_mean_of(kf: torch.Tensor, how: str) -> torch.Tensor:
    """[..., 1, D] (one vector for every key), or [..., S, D] for "per_tile" (each key's tile mean)."""
    s = kf.shape[-2]
    if how == "per_tile":
        return torch.cat([kf[..., t:t + TILE, :].mean(dim=-2, keepdim=True).expand_as(kf[..., t:t + TILE, :])
                          for t in range(0, s, TILE)], dim=-2)
    if how == "full":
        return kf.mean(dim=-2, keepdim=True)
    if how == "first_tile":
        return kf[..., :TILE, :].mean(dim=-2, keepdim=True)
    stride = max(s // TILE, 1)  # ~128 keys spread over the whole sequence
    return kf[..., ::stride, :].mean(dim=-2, keepdim=True)


def attention(q, k, v, k_mean: str, v_scale: str) -> torch.Tensor:
    """SageAttention2++ (per_thread INT8 groups, row_sum='quantized_p') with the chosen statistics; HND, no GQA."""
    qf, kf, vf = q.float(), k.float(), v.float()
    sq, skv, d = q.shape[-2], k.shape[-2], q.shape[-1]
    q_i8, q_s = quantize_int8_grouped(qf, q_token_groups(sq, "per_thread", TILE, q.device))
    mean = k_mean_of(kf, k_mean)
    k_i8, k_s = quantize_int8_grouped(kf - mean, k_token_groups(skv, "per_thread", TILE, k.device))
    # Keys shifted by different vectors need the shift back in the score: q·m_tile per query row and key tile
    # (fp32, from the unquantized q), a per-row constant within a tile. One shared vector needs none.
    shift = (qf @ mean.transpose(-1, -2)) * (d ** -0.5 * LOG2E) if mean.shape[-2] > 1 else None
    if v_scale == "per_channel":
        v_hat, v_sc = quantize_fp8_per_channel(vf)
        v_deq = v_hat * v_sc.unsqueeze(-2)
    else:
        tiles = [quantize_fp8_per_channel(vf[..., s:s + TILE, :]) for s in range(0, skv, TILE)]
        v_deq = torch.cat([vh * sc.unsqueeze(-2) for vh, sc in tiles], dim=-2)
    q_scaled = q_s * (d ** -0.5 * LOG2E)

    def scores_log2(start, end):
        t = (q_i8 @ k_i8[..., start:end, :].transpose(-1, -2)) * q_scaled.unsqueeze(-1) * k_s[..., None, start:end]
        return t if shift is None else t + shift[..., start:end]

    # v_deq holds the dequantized V̂ (V̂ times its scale): acc += P̂·(V̂·δ) is the kernel's acc += (P̂·V̂)·δ up to
    # fp32 rounding order, for a global scale as for per-tile ones.
    acc, l, _ = online_softmax_attention(
        scores_log2, e4m3_round, lambda s, e: v_deq[..., s:e, :], seq_q=sq, seq_kv=skv, kv_tile=TILE,
        p_offset_log2=P_FP8_OFFSET_LOG2, is_causal=False, device=q.device, row_sum_of_quantized_p=True)
    return acc / l.unsqueeze(-1)


def inputs(kind: str, heads: int, seq: int, d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, seq, d, generator=g)
    q[..., : d // 16] *= 8
    k = torch.randn(1, heads, seq, d, generator=g) + 8.0 * torch.randn(heads, 1, d, generator=g)
    v = torch.randn(1, heads, seq, d, generator=g)
    if kind == "joint_text_image":
        text = seq // 8  # Flux: 512 text tokens of 4608
        k[..., :text, :] = 3.0 * torch.randn(1, heads, text, d, generator=g) + 16.0 * torch.randn(heads, 1, d, generator=g)
        v[..., :text, :] *= 4.0
    return tuple(t.to(torch.bfloat16) for t in (q, k, v))


def study(args) -> list[dict]:
    rows = []
    for kind in ("dit", "joint_text_image"):
        for d in (128, 64):
            per = {(km, vs): [] for km in K_MEANS for vs in V_SCALES}
            for seed in range(args.seeds):
                q, k, v = inputs(kind, args.heads, args.seq, d, seed)
                ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
                for km, vs in per:
                    per[(km, vs)].append(accuracy_metrics(attention(q, k, v, km, vs), ref))
            for (km, vs), ms in per.items():
                rows.append({"inputs": kind, "head_dim": d, "k_mean": km, "v_scale": vs,
                             "rel_l1": statistics.mean(m["rel_l1"] for m in ms),
                             "cos_sim": statistics.mean(m["cos_sim"] for m in ms)})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    with torch.no_grad():
        rows = study(args)
    print(f"SageAttention2++ statistics vs fp64 SDPA (B=1, H={args.heads}, S={args.seq}, mean of {args.seeds} seeds)")
    print("| inputs | D | K mean | V scale | rel L1 | cos sim |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['inputs']} | {r['head_dim']} | {r['k_mean']} | {r['v_scale']} | {r['rel_l1']:.5f} | "
              f"{r['cos_sim']:.6f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seq": args.seq, "heads": args.heads, "seeds": args.seeds, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
