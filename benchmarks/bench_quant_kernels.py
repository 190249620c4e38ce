"""Which CPU kernel should run a quantized Linear? Times candidates against fp32 in one run.

    python benchmarks/bench_quant_kernels.py            # GPT-2-small and char-model shapes, 1 and 8 tokens
    python benchmarks/bench_quant_kernels.py --torchao  # also torchao's quantize_ configs (if installed)

Prints microseconds per call and the ratio to fp32 `F.linear` measured in the same run (> 1 means
faster than fp32). Every candidate uses the same random weight; the last column is the max error
of its output against fp32 relative to the output's max, so a fast-but-wrong kernel shows up.
This is how the runtime kernels of llmcli/quantize/modules.py were chosen (see its module docstring).

Measured on the 2-core AVX2 dev machine (torch 2.13 CPU, 1 thread, torchao 0.18), x fp32 speed
at 1 token / 8 tokens:

    Linear out x in                    3072x768       768x3072       768x768     384x128
    int8 dyn-act fbgemm, reduce_range  2.0 / 3.3      2.0 / 4.1      1.1-1.3     0.35 / 0.5
    int8 dyn-act onednn                0.5 / 1.4      0.5 / 1.8      0.4-0.5     0.15 / 0.2
    int8 dyn-act qnnpack               0.4 / 0.7      0.4 / 1.1      0.2-0.4     0.2 / 0.4
    int8 _weight_int8pack_mm           0.10 / 0.05    0.08 / 0.06    0.01-0.1    0.2 / 0.06
    int8 per-token act + torch._int_mm 0.14 / 0.07    0.11 / 0.09    0.01-0.1    0.12 / 0.08
    int4 _weight_int4pack_mm_for_cpu   0.05 / 0.02    0.04 / 0.03    0.01-0.05   0.09 / 0.03
    torchao Int8WeightOnlyConfig       0.47 / 0.79    0.37 / 0.69        -       0.12 / 0.37
    torchao Int8DynActInt8WeightConfig 0.12 / 0.07    0.10 / 0.07        -       0.03 / 0.04

fbgemm without reduce_range is no faster and 3-10x less accurate (AVX2's u8*s8 pair sums
saturate int16). int4: only "dequantized to fp32 at load" keeps float32 speed.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def timeit(fn, min_time: float = 0.25, warmup: int = 5) -> float:
    """Median microseconds per call over batches of calls lasting ~min_time seconds in total."""
    for _ in range(warmup):
        fn()
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < min_time / 5:
        fn()
        n += 1
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - t0) / n)
    return sorted(samples)[2] * 1e6


def candidates(w: torch.Tensor, b: torch.Tensor, use_torchao: bool):
    """(name, fn(x) -> y) pairs for a Linear with weight w [N, K] and bias b [N]."""
    N, K = w.shape
    out = [("fp32 F.linear", lambda x: F.linear(x, w, b))]

    # int8 symmetric per-output-channel weight.
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q8 = torch.clamp(torch.round(w / scale[:, None]), -128, 127).to(torch.int8)

    qw = torch._make_per_channel_quantized_tensor(q8, scale.double(), torch.zeros(N, dtype=torch.long), 0)
    for engine in ("fbgemm", "onednn", "qnnpack"):
        if engine not in torch.backends.quantized.supported_engines:
            continue
        torch.backends.quantized.engine = engine
        try:
            packed = torch.ops.quantized.linear_prepack(qw, b)
        except RuntimeError:
            continue
        for rr in (True, False):
            out.append((f"int8 dyn-act {engine} reduce_range={rr}",
                        lambda x, p=packed, rr=rr, e=engine: _with_engine(
                            e, lambda: torch.ops.quantized.linear_dynamic(x, p, rr))))
    torch.backends.quantized.engine = "x86"

    out.append(("int8 weight-only _weight_int8pack_mm",
                lambda x: torch._weight_int8pack_mm(x.reshape(-1, K), q8, scale).reshape(*x.shape[:-1], N) + b))
    out.append(("int8 dequant-per-call", lambda x: F.linear(x, q8.float() * scale[:, None], b)))

    # int8 x int8 per-token activations with torch._int_mm (needs M > 16 on some builds).
    def int_mm(x):
        x2 = x.reshape(-1, K)
        s = (x2.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-12)
        xq = torch.clamp(torch.round(x2 / s), -127, 127).to(torch.int8)
        acc = torch._int_mm(xq, q8.t())
        return (acc.float() * s * scale + b).reshape(*x.shape[:-1], N)
    out.append(("int8 per-token act torch._int_mm", int_mm))

    # int4 group-wise (group 32, asymmetric) with the CPU tinygemm kernel.
    G = 32
    wg = w.reshape(N, K // G, G)
    lo, hi = wg.amin(-1), wg.amax(-1)
    s4 = ((hi - lo) / 15).clamp(min=1e-12)
    q4 = torch.clamp(torch.round((wg - lo[..., None]) / s4[..., None]), 0, 15).to(torch.int32).reshape(N, K)
    try:
        packed4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4, 1)
        # tinygemm's zero point is in the float domain: w = (q - 8) * s + zero, zero = lo + 8 * s.
        sz = torch.stack([s4, lo + 8 * s4], dim=-1).transpose(0, 1).contiguous()  # [K/G, N, 2]
        out.append(("int4 g32 _weight_int4pack_mm_for_cpu",
                    lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(
                        x.reshape(-1, K), packed4, G, sz).reshape(*x.shape[:-1], N) + b))
    except (RuntimeError, AttributeError) as exc:
        print(f"  (int4pack unavailable: {str(exc).splitlines()[0]})")
    w4 = ((q4.reshape(N, K // G, G).float() * s4[..., None]) + lo[..., None]).reshape(N, K)
    out.append(("int4 dequantized to fp32 at load", lambda x: F.linear(x, w4, b)))

    if use_torchao:
        out += _torchao_candidates(w, b)
    return out


def _with_engine(engine, fn):
    prev = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        return fn()
    finally:
        torch.backends.quantized.engine = prev


def _torchao_candidates(w, b):
    import copy

    try:
        from torchao.quantization import (
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            quantize_,
        )
    except ImportError:
        print("  (torchao is not installed: pip install torchao)")
        return []
    base = torch.nn.Sequential(torch.nn.Linear(w.shape[1], w.shape[0]))
    with torch.no_grad():
        base[0].weight.copy_(w)
        base[0].bias.copy_(b)
    out = []
    configs = [("torchao Int8WeightOnlyConfig", lambda: Int8WeightOnlyConfig()),
               ("torchao Int8DynamicActivationInt8WeightConfig", lambda: Int8DynamicActivationInt8WeightConfig()),
               ("torchao Int4WeightOnlyConfig g32 (cpu layout)", _int4_cpu_config)]
    for name, make in configs:
        try:
            m = copy.deepcopy(base)
            quantize_(m, make())
            with torch.no_grad():
                m(torch.randn(1, w.shape[1]))
            out.append((name, lambda x, m=m: m(x)))
        except Exception as exc:
            print(f"  ({name} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100]})")
    return out


def _int4_cpu_config():
    from torchao.quantization import Int4WeightOnlyConfig
    try:
        return Int4WeightOnlyConfig(group_size=32, int4_packing_format="opaque")
    except TypeError:
        return Int4WeightOnlyConfig(group_size=32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torchao", action="store_true")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is steadiest when other jobs share the cores)")
    parser.add_argument("--shapes", default="768x768,3072x768,768x3072,384x128,128x384",
                        help="comma-separated NxK (out x in)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for shape in args.shapes.split(","):
        N, K = (int(v) for v in shape.split("x"))
        w, b = torch.randn(N, K) * 0.02, torch.randn(N) * 0.01
        cands = candidates(w, b, args.torchao)
        for M in args.tokens:
            x = torch.randn(M, K)
            with torch.inference_mode():
                ref = F.linear(x, w, b)
                print(f"\nLinear out={N} in={K}, {M} token(s):")
                base_us = None
                for name, fn in cands:
                    try:
                        y = fn(x)
                    except Exception as exc:
                        print(f"  {name:48s} failed: {str(exc).splitlines()[0][:80]}")
                        continue
                    us = timeit(lambda fn=fn, x=x: fn(x))
                    base_us = base_us or us
                    err = ((y - ref).abs().max() / ref.abs().max()).item()
                    print(f"  {name:48s} {us:9.1f} us  {base_us / us:5.2f}x fp32  rel.err {err:.1e}")


if __name__ == "__main__":
    main()
