#!/usr/bin/env python3
"""Checks the paged attention cases torchcheck wrote against torch's SDPA (issue 18).

Usage: python3 check.py DIR [--device cuda|cpu] [--tol 1e-3]

For every DIR/<case>/case.json it dequantises the stored K and V (fp8 codes viewed as
torch.float8_e4m3fn or torch.float8_e5m2, times the scale), builds the case's boolean mask,
runs torch.nn.functional.scaled_dot_product_attention per sequence (its math backend, the
definition, in float32 without TF32) and prints the largest absolute difference from the
kernel's output. GQA repeats the KV heads; MLA scores over the whole row and takes the first
latent_dim elements as V. A sequence of length 0 must give zeros. Masked cases also print how
far the output is from unmasked attention, which shows the check could fail. Exits 1 when any
case is over the tolerance, 2 when there is no case.
"""
import argparse
import json
import pathlib
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def load(path, dtype):
    return torch.frombuffer(bytearray(path.read_bytes()), dtype=dtype)


def rows(path, c, n, scale, device):
    """The stored rows as float32 [tokens, kv_heads, head_dim], dequantised."""
    if c["format"] == "fp16":
        x = load(path, torch.float16).float()
    else:
        x = load(path, torch.uint8).view(DTYPES[c["format"]]).float()
        x = x * torch.tensor(scale, dtype=torch.float32)
    return x.reshape(n, c["kv_heads"], c["head_dim"]).to(device)


def mask(c, L, device):
    """Which positions the query at position L-1 attends."""
    p = torch.arange(L, device=device)
    if c["window"] > 0:
        return (p >= L - c["window"]) | (p < c["sinks"])
    if c["chunk"] > 0:
        return p >= (L - 1) // c["chunk"] * c["chunk"]
    return torch.ones(L, dtype=torch.bool, device=device)


def check(d, device):
    """Returns the case in folder d, its max abs error, the values compared, and for a masked
    case how far the output is from unmasked attention (so that the check could fail)."""
    c = json.loads((d / "case.json").read_text())
    H, G, D, lens = c["heads"], c["kv_heads"], c["head_dim"], c["lens"]
    mla = c["latent_dim"] > 0
    dv = c["latent_dim"] if mla else D
    n = sum(lens)
    q = load(d / "q.bin", torch.float16).float().reshape(len(lens), H, D).to(device)
    out = load(d / "out.bin", torch.float32).reshape(len(lens), H, dv).to(device)
    k = rows(d / "k.bin", c, n, c["k_scale"], device)
    v = k[..., :dv] if mla else rows(d / "v.bin", c, n, c["v_scale"], device)
    worst, unmasked, start = 0.0, 0.0, 0
    for s, L in enumerate(lens):
        if L == 0:
            want = full = torch.zeros(H, dv, device=device)
        else:
            ks = k[start:start + L].transpose(0, 1).repeat_interleave(H // G, dim=0)  # [H, L, D]
            vs = v[start:start + L].transpose(0, 1).repeat_interleave(H // G, dim=0)  # [H, L, dv]
            m = mask(c, L, device).unsqueeze(0)
            want = F.scaled_dot_product_attention(q[s].unsqueeze(1), ks, vs, attn_mask=m, scale=c["scale"]).squeeze(1)
            full = F.scaled_dot_product_attention(q[s].unsqueeze(1), ks, vs, scale=c["scale"]).squeeze(1)
        e = (want - out[s]).abs().max().item()
        worst = max(worst, e if e == e else float("inf"))  # a NaN is as bad as it gets
        unmasked = max(unmasked, (full - out[s]).abs().max().item())
        start += L
    return c, worst, out.numel(), unmasked


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir", type=pathlib.Path)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tol", type=float, default=1e-3)
    args = ap.parse_args()
    torch.set_float32_matmul_precision("highest")  # no TF32: the reference is float32
    where = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    cases = sorted(p.parent for p in args.dir.glob("*/case.json"))
    if not cases:
        print(f"no case under {args.dir}")
        return 2
    image = json.loads((cases[0] / "case.json").read_text())["image"]
    print(f"kernels image {image}; torch {torch.__version__} on {where}, SDPA in float32, tolerance {args.tol:g}")
    bad = 0
    for d in cases:
        with sdpa_kernel(SDPBackend.MATH):
            c, err, n, unmasked = check(d, args.device)
        over = err > args.tol
        masked = c["window"] > 0 or c["chunk"] > 0
        print(f"case {c['name']}: max abs error {err:.3g} (over {n} values)"
              + (f"; from unmasked attention {unmasked:.3g}" if masked else "")
              + ("  OVER TOLERANCE" if over else ""))
        bad += over
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
