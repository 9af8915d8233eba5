"""GB/s of weights streamed by a product of a few rows with a weight, for each way of computing
it on CPU: the question behind bf16, int8 and 4-bit decode (issue 14).

    .venv/bin/python benchmarks/matvec.py [--rows 1 4 16] [--n 5632 --k 1024 --count 24] [--compile]

Each candidate multiplies the same activations with ``--count`` distinct [n, k] weights in
turn (more bytes than the cache holds, so each weight comes from memory, as in decode), and
its GB/s counts the weight bytes it reads. The roofline row sums a buffer of the same bytes in
fp32 with the same threads. ``--compile`` adds inductor's multiply-and-sum (slow to build).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common

from _common import median_time  # noqa: E402


def timed(fn, reps: int) -> float:
    fn()  # warm-up: first-touch pages, oneDNN's primitive cache
    return median_time(fn, reps)


def _int4pack(qweight: torch.Tensor, scale: torch.Tensor, minv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same 4-bit groups in torch's own CPU int4 layout: w = (q - 8) * scale + zero."""
    from tpserve.parallel import matvec

    n = qweight.shape[0]
    values = ((matvec.dequantize_q4(qweight, scale, minv) - minv.float().repeat_interleave(32, 1))
              / scale.float().clamp(min=1e-8).repeat_interleave(32, 1)).round().to(torch.int32)
    zeros = minv.float() + 8 * scale.float()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values.reshape(n, -1), 1)
    return packed, torch.stack([scale.float(), zeros], -1).transpose(0, 1).contiguous().bfloat16()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="*", default=[1, 4, 16])
    parser.add_argument("--n", type=int, default=5632)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--count", type=int, default=24)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()

    from tpserve.parallel import matvec

    torch.manual_seed(0)
    n, k, count = args.n, args.k, args.count
    w32 = [torch.randn(n, k) * 0.02 for _ in range(count)]
    w16 = [w.bfloat16() for w in w32]
    q8 = [matvec.quantize_rows(w) for w in w32]
    q4 = [matvec.quantize_q4(w) for w in w32]
    int4 = [_int4pack(*q) for q in q4]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in w16] if torch.backends.mkldnn.is_available() else None
    ext = matvec.extension()
    buffer = torch.ones(count * n * k // 2)  # the bf16 weights' bytes, in fp32
    roof = count * n * k * 2 / timed(lambda: buffer.sum(), args.reps) / 1e9
    print(f"{count} weights of [{n}, {k}], {torch.get_num_threads()} threads; "
          f"read bandwidth (sum of a {buffer.numel() * 4 / 1e6:.0f} MB buffer): {roof:.1f} GB/s")
    print(f"bf16 kernel: {ext.bf16_path() if ext is not None else 'unavailable'}\n")
    print(f"{'path':<52}" + "".join(f"{f'M={m} GB/s':>12}{'ms':>8}" for m in args.rows))

    def candidates(m: int):
        x32 = torch.randn(m, k)
        x16 = x32.bfloat16()
        yield "fp32 F.linear", 4, lambda: [F.linear(x32, w) for w in w32]
        yield "bf16 F.linear", 2, lambda: [F.linear(x16, w) for w in w16]

        def no_onednn():
            with torch.backends.mkldnn.flags(enabled=False):
                return [F.linear(x16, w) for w in w16]
        yield "bf16 F.linear, oneDNN off", 2, no_onednn
        yield "bf16 x @ W^T pre-transposed [K, N]", 2, lambda: [x16 @ wt for wt in transposed]
        if packed is not None:
            yield "bf16 oneDNN prepacked (_linear_pointwise)", 2, lambda: [
                torch.ops.mkldnn._linear_pointwise(x16, p, None, "none", [], "") for p in packed]
        if ext is not None:
            yield "bf16 tpserve kernel", 2, lambda: [ext.bf16_linear(x16, w, None, False) for w in w16]
        yield "int8 _weight_int8pack_mm, bf16 x", 1, lambda: [
            torch.ops.aten._weight_int8pack_mm(x16, q, s.bfloat16()) for q, s in q8]
        if ext is not None:
            yield "int8 tpserve kernel, bf16 x", 1, lambda: [ext.int8_linear(x16, q, s, None, False) for q, s in q8]
        yield "int4 _weight_int4pack_mm_for_cpu (group 32), bf16 x", 0.625, lambda: [
            torch.ops.aten._weight_int4pack_mm_for_cpu(x16, p, 32, sz) for p, sz in int4]
        if ext is not None:
            yield "q4 tpserve kernel (GGUF Q4 groups), bf16 x", 0.625, lambda: [
                ext.q4_linear(x16, *q, None, False) for q in q4]
        yield "int8 dequantized to bf16, then F.linear", 1, lambda: [
            F.linear(x16, q.to(torch.bfloat16) * s.bfloat16()[:, None]) for q, s in q8]
        if args.compile:
            fn = torch.compile(lambda x, w: (x.unsqueeze(-2) * w).sum(-1, dtype=torch.float32), dynamic=False)
            yield "bf16 compiled multiply-and-sum (fp32 acc)", 2, lambda: [fn(x16, w) for w in w16]

    transposed = [w.t().contiguous() for w in w16]
    table: dict[str, list[str]] = {}
    for m in args.rows:
        for name, size, fn in candidates(m):
            t = timed(fn, args.reps)
            table.setdefault(name, []).append(f"{count * n * k * size / t / 1e9:>12.1f}{t * 1e3:>8.1f}")
    for name, cells in table.items():
        print(f"{name:<52}" + "".join(cells))


if __name__ == "__main__":
    main()
