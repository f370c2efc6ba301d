"""How much of ALP's noise survives a bf16 forward (docs/alp.md, "sigma and bf16").

    python tools/alp_bf16_rounding.py [--n 4000000]

The perturbation adds ``sigma * xi`` to the bf16 residual stream h the way
``megatron_alp.model.alp.perturb`` does (noise scaled in fp32, cast to h's dtype, added in h's
dtype) and counts the elements whose bf16 value changed, for h ~ N(0, 1) and for |h| in bands.
"""

from __future__ import annotations

import argparse

import torch


def changed_fraction(h: torch.Tensor, sigma: float, gen: torch.Generator) -> float:
    xi = torch.randn(h.shape, generator=gen, dtype=torch.float32)
    out = torch.add(h, (xi * sigma).to(h.dtype))  # as perturb.py: noise in fp32, cast, add in bf16
    return (out != h).double().mean().item()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4_000_000)
    args = ap.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    normal = torch.randn(args.n, generator=gen).to(torch.bfloat16)
    bands = {"|h| in [0.5, 1)": (0.5, 1.0), "|h| in [1, 2)": (1.0, 2.0), "|h| in [1e-3, 1e-2)": (1e-3, 1e-2)}
    print(f"{'sigma':>8}  {'h ~ N(0,1)':>12}  " + "  ".join(f"{b:>20}" for b in bands))
    for sigma in (1e-8, 1e-6, 1e-4, 0.02):
        row = [changed_fraction(normal, sigma, gen)]
        for lo, hi in bands.values():
            mag = lo * (hi / lo) ** torch.rand(args.n, generator=gen)
            sign = torch.where(torch.rand(args.n, generator=gen) < 0.5, -1.0, 1.0)
            row.append(changed_fraction((sign * mag).to(torch.bfloat16), sigma, gen))
        print(f"{sigma:>8.0e}  " + "  ".join(f"{100 * v:>11.4f}%" if i == 0 else f"{100 * v:>19.4f}%"
                                          for i, v in enumerate(row)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
