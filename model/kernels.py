"""Log-probabilities and entropies of chosen tokens, computed from last hidden states and the lm_head
without ever holding fp32 logits for all tokens at once.

    logp, entropy = logprob_entropy(hidden, weight, targets, temperature=0.7)
    # hidden [N, H] (bf16/fp32), weight [V, H] (the lm_head), targets [N] int64
    # logp [N] fp32, differentiable w.r.t. hidden and weight; entropy [N] fp32, detached

Both use z = logits / temperature in fp32:
    logp    = z[target] - logsumexp(z)
    entropy = logsumexp(z) - sum(softmax(z) * z)
and the backward is analytic: d logp / d z = onehot(target) - softmax(z), so a chunk's logits are
recomputed in the backward instead of being stored (one extra lm_head matmul buys the memory).

Two implementations with the same API:
  * torch: token chunks sized by a memory budget; per chunk one fp32 logits block. Runs anywhere.
  * triton (CUDA): a forward kernel that sweeps vocab tiles with an online log-sum-exp (running max starts
    at -inf, masked tail tile, so any vocab size works), written as a split over the vocabulary so that even
    a few thousand tokens fill the GPU; the backward runs over vocab tiles: a kernel recomputes the tile's
    logits and writes d logp / d logits in the weight's dtype, then cuBLAS does grad_W[tile] (one GEMM over
    all tokens, fp32 accumulation inside) and grad_hidden (accumulated in fp32 across tiles).
`backend="auto"` picks triton for CUDA tensors when triton imports, torch otherwise. `backend="triton"` on
CPU tensors is allowed under TRITON_INTERPRET=1 (set before triton is first imported), for testing.
"""
from __future__ import annotations

import math
import os

import torch

# Bytes of one fp32 logits tile of the torch backend. On a 2-core CPU, 32-64 MB tiles measured fastest (smaller
# ones pay per-op overhead and thin GEMMs); on GPU bigger tiles mean bigger, more efficient GEMMs.
CPU_CHUNK_BYTES = 64 * 2**20
GPU_CHUNK_BYTES = 256 * 2**20
TORCH_MIN_TILE = 128
TRITON_BWD_TILE_BYTES = 512 * 2**20


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def pick_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "torch":
        return backend
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package: pip install triton")
        if device.type != "cuda" and not _triton_interpreted():
            raise RuntimeError(f"backend='triton' on {device.type} tensors only works under the Triton interpreter: "
                               "set TRITON_INTERPRET=1 before triton is imported, or use backend='torch'")
        return backend
    raise ValueError(f"unknown backend {backend!r}; choose auto, torch or triton")


def logprob_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                    with_entropy: bool = True, backend: str = "auto", chunk_rows: int | None = None,
                    chunk_cols: int | None = None):
    """Log-prob of `targets` and entropy of softmax(hidden @ weight.T / temperature), row by row.

    hidden [N, H], weight [V, H], targets [N] int64 -> (logp [N] fp32, entropy [N] fp32 detached, or None).
    chunk_rows, chunk_cols: token rows per block and vocab columns per tile of the torch backend (default:
    4096 rows on CPU / 16384 on GPU, columns from a memory budget for one fp32 tile).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden [N, H] and weight [V, H], got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)} (flatten batch dims first: hidden.reshape(-1, H))")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be [N]={tuple(hidden.shape[:1])}, got {tuple(targets.shape)}")
    if hidden.device != weight.device or targets.device != hidden.device:
        raise ValueError(f"hidden, weight and targets must be on one device, got {hidden.device}, {weight.device}, "
                         f"{targets.device}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    targets = targets.long()
    V = weight.shape[0]
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= V):
        raise ValueError(f"target ids must lie in [0, {V}), got range [{int(targets.min())}, {int(targets.max())}]")
    if hidden.dtype != weight.dtype:  # e.g. fp32 norm output under autocast with a bf16 head
        hidden = hidden.to(weight.dtype)
    if pick_backend(backend, hidden.device) == "triton":
        logp, entropy = _TritonLogprobEntropy.apply(hidden, weight, targets, float(temperature), with_entropy)
    else:
        logp, entropy = _ChunkedLogprobEntropy.apply(hidden, weight, targets, float(temperature), with_entropy,
                                                     chunk_rows, chunk_cols)
    return logp, (entropy if with_entropy else None)


def naive_logprob_entropy(hidden, weight, targets, temperature: float = 1.0, with_entropy: bool = True):
    """The textbook version (full [N, V] fp32 logits): the baseline for benchmarks."""
    logits = (hidden @ weight.T).float() / temperature  # [N, V]
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(1, targets[:, None]).squeeze(1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


# ----------------------------------------------------------------------------------------------------------------
# torch backend: blocks of token rows x vocab tiles, online log-sum-exp across tiles


def torch_tiles(N: int, V: int, device: torch.device, chunk_rows: int | None = None,
                chunk_cols: int | None = None) -> tuple[int, int]:
    """(rows per block, vocab columns per tile) so that one [rows, cols] fp32 logits tile fits the budget.
    Tiling the vocabulary (not only the tokens) lets each grad_W tile be one GEMM over a whole row block,
    instead of re-reading and re-writing all of grad_W once per small token chunk."""
    budget = GPU_CHUNK_BYTES if device.type == "cuda" else CPU_CHUNK_BYTES
    rows = chunk_rows or (16384 if device.type == "cuda" else 4096)
    rows = max(1, min(rows, N))
    cols = chunk_cols or max(TORCH_MIN_TILE, budget // (4 * rows) // TORCH_MIN_TILE * TORCH_MIN_TILE)
    return rows, max(1, min(cols, V))


def tile(buffer: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A contiguous [rows, cols] view of the front of a flat buffer (the last tile may be smaller)."""
    return buffer[: rows * cols].view(rows, cols)


class _ChunkedLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, with_entropy, chunk_rows, chunk_cols):
        N, V = hidden.shape[0], weight.shape[0]
        rows, cols = torch_tiles(N, V, hidden.device, chunk_rows, chunk_cols)
        inv_t = 1.0 / temperature
        # the softmax is kept as (row max, log sum exp(z - max)): folding them into one fp32 lse would round
        # it to eps * |max|, which for logits of magnitude 1e3 is a visible error in the backward's softmax
        row_max = torch.empty(N, dtype=torch.float32, device=hidden.device)
        log_sum = torch.empty_like(row_max)
        logp = torch.empty_like(row_max)
        entropy = torch.empty_like(row_max) if with_entropy else row_max.new_empty(0)
        # two tile buffers reused across tiles: on CPU a fresh tens-of-MB tensor per tile is a fresh mmap, and
        # faulting its pages in costs more than the elementwise work on it
        z_buf = torch.empty(rows * cols, dtype=torch.float32, device=hidden.device)
        e_buf = torch.empty_like(z_buf)
        for r0 in range(0, N, rows):
            r1 = min(r0 + rows, N)
            h32 = hidden[r0:r1].float() * inv_t  # [R, H]: temperature folded into the small operand
            tgt = targets[r0:r1]
            # per row: running max m, s = sum exp(z - m), t = sum exp(z - m) * (z - m), target logit
            m = s = t = None
            z_target = torch.zeros(r1 - r0, dtype=torch.float32, device=hidden.device)
            for v0 in range(0, V, cols):
                v1 = min(v0 + cols, V)
                z = torch.mm(h32, weight[v0:v1].float().T, out=tile(z_buf, r1 - r0, v1 - v0))  # [R, C] fp32
                in_tile = (tgt >= v0) & (tgt < v1)
                local = (tgt - v0).clamp(0, v1 - v0 - 1)[:, None]
                z_target += torch.where(in_tile, z.gather(1, local).squeeze(1), 0.0)
                m_tile = z.amax(1)
                if m is None:  # first tile: nothing to rescale
                    m, s, t = m_tile, torch.zeros_like(m_tile), torch.zeros_like(m_tile)
                m_new = torch.maximum(m, m_tile)
                alpha = torch.exp(m - m_new)
                z.sub_(m_new[:, None])
                e = torch.exp(z, out=tile(e_buf, r1 - r0, v1 - v0))
                e_sum = e.sum(1)
                if with_entropy:  # shifting t from m to m_new: sum e*(z - m_new) = sum e*(z - m) + (m - m_new)*s
                    t = alpha * (t + (m - m_new) * s) + e.mul_(z).sum(1)  # in place: no tile-sized temporary
                s = alpha * s + e_sum
                m = m_new
            row_max[r0:r1], log_sum[r0:r1] = m, torch.log(s)
            logp[r0:r1] = (z_target - m) - log_sum[r0:r1]
            if with_entropy:  # H = lse - sum p z = log s - t / s  (both relative to m)
                entropy[r0:r1] = log_sum[r0:r1] - t / s
        ctx.save_for_backward(hidden, weight, targets, row_max, log_sum)
        ctx.temperature, ctx.rows, ctx.cols = temperature, rows, cols
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, row_max, log_sum = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        N, V = hidden.shape[0], weight.shape[0]
        rows, cols, inv_t = ctx.rows, ctx.cols, 1.0 / ctx.temperature
        # d logp_i / d logits_i = (onehot_i - p_i) / T, p_i = exp(z_i - max_i) / s_i. The per-row factors gs_i =
        # grad_i / T and 1 / s_i are folded into the [R, H] operands and results, and the onehot part is a row
        # gather / scatter, so the [R, C] tile only needs exp(z - max).
        grad_scale = grad_logp.float() * inv_t  # [N]
        grad_h = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        e_buf = torch.empty(rows * cols, dtype=torch.float32, device=hidden.device)
        for r0 in range(0, N, rows):
            r1 = min(r0 + rows, N)
            h32 = hidden[r0:r1].float()  # [R, H]
            gs = grad_scale[r0:r1, None]  # [R, 1]
            inv_s = torch.exp(-log_sum[r0:r1, None])  # [R, 1]
            neg_gs_h = h32 * (-gs * inv_s)  # [R, H]
            h_scaled = h32 * inv_t  # the forward's exact operand, so z is recomputed bit for bit
            e_w = torch.zeros_like(h32) if need_h else None  # sum over tiles of exp(z - max) @ W_tile
            for v0 in range(0, V, cols):
                v1 = min(v0 + cols, V)
                w32 = weight[v0:v1].float()  # [C, H]
                e = torch.mm(h_scaled, w32.T, out=tile(e_buf, r1 - r0, v1 - v0))
                e.sub_(row_max[r0:r1, None]).exp_()  # [R, C] = s * softmax
                if need_h:
                    e_w.addmm_(e, w32)
                if need_w:
                    grad_w[v0:v1].addmm_(e.T, neg_gs_h)
            if need_h:
                grad_h[r0:r1] = gs * (weight[targets[r0:r1]].float() - e_w * inv_s)
            if need_w:
                grad_w.index_add_(0, targets[r0:r1], h32 * gs)
        return (grad_h.to(hidden.dtype) if need_h else None, grad_w.to(weight.dtype) if need_w else None,
                None, None, None, None, None)


# ----------------------------------------------------------------------------------------------------------------
# triton backend

_KERNELS = None  # built on first use, so importing this module never imports triton


def _build_kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def fwd_kernel(h_ptr, w_ptr, tgt_ptr, m_ptr, s_ptr, t_ptr, zt_ptr, N, V, H, stride_hn, stride_wv,
                   inv_temp, v_per_split, WITH_ENTROPY: tl.constexpr, FP32_DOT: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
        # One program: BLOCK_N tokens x one slice of the vocabulary. It keeps, per token, the running max m,
        # s = sum exp(z - m), t = sum exp(z - m) * (z - m) (for the entropy) and the target's logit zt.
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        target = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
        h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_hn
        m = tl.full([BLOCK_N], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_N], tl.float32)
        t = tl.zeros([BLOCK_N], tl.float32)
        zt = tl.zeros([BLOCK_N], tl.float32)
        v_start = pid_s * v_per_split
        v_end = tl.minimum(v_start + v_per_split, V)
        for v0 in range(v_start, v_end, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_ok = cols < v_end
            w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_wv
            acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
            for k0 in range(0, H, BLOCK_H):
                ks = k0 + tl.arange(0, BLOCK_H)
                k_ok = ks < H
                a = tl.load(h_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BN, BH]
                b = tl.load(w_cols + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)  # [BH, BV]
                if FP32_DOT:
                    acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
                else:
                    acc = tl.dot(a, b, acc)
            z = acc * inv_temp
            z_masked = tl.where(col_ok[None, :], z, float("-inf"))
            # every tile holds at least one real column, so m_new is finite and exp(-inf - m_new) = 0
            m_new = tl.maximum(m, tl.max(z_masked, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(z_masked - m_new[:, None])  # 0 on padding columns
            if WITH_ENTROPY:  # re-centre t on m_new: sum e*(z - m_new) = sum e*(z - m) + (m - m_new) * s
                shift = tl.where(s > 0, (m - m_new) * s, 0.0)  # s == 0 before the first tile (m = -inf)
                t = (t + shift) * alpha + tl.sum(p * (z - m_new[:, None]), axis=1)
            s = s * alpha + tl.sum(p, axis=1)
            zt += tl.sum(tl.where(cols[None, :] == target[:, None], z, 0.0), axis=1)
            m = m_new
        out = pid_s * N + rows
        tl.store(m_ptr + out, m, mask=row_ok)
        tl.store(s_ptr + out, s, mask=row_ok)
        tl.store(t_ptr + out, t, mask=row_ok)
        tl.store(zt_ptr + out, zt, mask=row_ok)

    @triton.jit
    def bwd_kernel(h_ptr, w_ptr, tgt_ptr, max_ptr, logsum_ptr, gs_ptr, g_ptr, N, VT, H, v_offset, stride_hn,
                   stride_wv,
                   stride_gn, inv_temp, FP32_DOT: tl.constexpr, GROUP_N: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
        # g[n, v] = (onehot(target) - softmax(z))[n, v] * grad_logp[n] / temperature for one vocab tile
        # (w_ptr points at its first row, v_offset is its first vocab id), stored in g's dtype.
        pid = tl.program_id(0)
        num_n = tl.cdiv(N, BLOCK_N)
        num_v = tl.cdiv(VT, BLOCK_V)
        # grouped order: neighbouring programs share token rows, for L2 reuse
        per_group = GROUP_N * num_v
        first_n = (pid // per_group) * GROUP_N
        group_size = tl.minimum(num_n - first_n, GROUP_N)
        pid_n = first_n + (pid % per_group) % group_size
        pid_v = (pid % per_group) // group_size
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        row_ok = rows < N
        col_ok = cols < VT
        h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_hn
        w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_wv
        acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        for k0 in range(0, H, BLOCK_H):
            ks = k0 + tl.arange(0, BLOCK_H)
            k_ok = ks < H
            a = tl.load(h_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_cols + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if FP32_DOT:
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        row_max = tl.load(max_ptr + rows, mask=row_ok, other=0.0)
        log_sum = tl.load(logsum_ptr + rows, mask=row_ok, other=0.0)
        gs = tl.load(gs_ptr + rows, mask=row_ok, other=0.0)
        target = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
        p = tl.exp((acc * inv_temp - row_max[:, None]) - log_sum[:, None])
        onehot = (cols[None, :] + v_offset) == target[:, None]
        g = (tl.where(onehot, 1.0, 0.0) - p) * gs[:, None]
        g_ptrs = g_ptr + rows.to(tl.int64)[:, None] * stride_gn + cols[None, :]
        tl.store(g_ptrs, g.to(g_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    if _triton_interpreted():
        return fwd_kernel, bwd_kernel, False
    # Hopper-friendly tiles (wgmma wants 64-row multiples); the tuner drops configs that do not fit.
    cfg = triton.Config
    fwd_configs = [cfg(dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=64), num_warps=8, num_stages=3),
                   cfg(dict(BLOCK_N=128, BLOCK_V=256, BLOCK_H=64), num_warps=8, num_stages=3),
                   cfg(dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64), num_warps=4, num_stages=4),
                   cfg(dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=32), num_warps=4, num_stages=4)]
    bwd_configs = [cfg(dict(BLOCK_N=128, BLOCK_V=256, BLOCK_H=64, GROUP_N=8), num_warps=8, num_stages=3),
                   cfg(dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=64, GROUP_N=8), num_warps=8, num_stages=4),
                   cfg(dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=64, GROUP_N=8), num_warps=4, num_stages=4),
                   cfg(dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64, GROUP_N=8), num_warps=4, num_stages=4)]
    fwd_tuned = triton.autotune(fwd_configs, key=["H", "V", "WITH_ENTROPY", "FP32_DOT"])(fwd_kernel)
    bwd_tuned = triton.autotune(bwd_configs, key=["H", "FP32_DOT"])(bwd_kernel)
    return fwd_tuned, bwd_tuned, True


def _kernels():
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = _build_kernels()
    return _KERNELS


# Interpreter tiles: small, so tests cover several tiles and masked tails with tiny shapes.
_INTERP_FWD = dict(BLOCK_N=16, BLOCK_V=64, BLOCK_H=32)
_INTERP_BWD = dict(BLOCK_N=16, BLOCK_V=64, BLOCK_H=32, GROUP_N=2)
SPLIT_MULTIPLE = 256  # vocab splits are multiples of every BLOCK_V


def _fp32_dot(dtype: torch.dtype) -> bool:
    """fp32 inputs need exact fp32 dots (not tf32). The interpreter multiplies bf16 tiles as raw integers,
    so there every dot is done on tiles upcast to fp32 (exact for bf16 products)."""
    return dtype == torch.float32 or _triton_interpreted()


def _vocab_splits(N: int, V: int, device: torch.device) -> int:
    """How many vocab slices the forward runs in parallel: enough programs to fill the GPU (~4 per SM)."""
    if device.type != "cuda":
        return 2 if V > SPLIT_MULTIPLE else 1  # interpreter: still exercise the cross-split combine
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    row_blocks = math.ceil(N / 128)
    max_splits = max(1, math.ceil(V / (SPLIT_MULTIPLE * 4)))  # keep >= 4 tiles per slice
    return max(1, min(max_splits, math.ceil(4 * sms / row_blocks)))


def _triton_forward(hidden, weight, targets, temperature, with_entropy):
    fwd, _, tuned = _kernels()
    import triton

    N, H = hidden.shape
    V = weight.shape[0]
    splits = _vocab_splits(N, V, hidden.device)
    v_per_split = math.ceil(math.ceil(V / splits) / SPLIT_MULTIPLE) * SPLIT_MULTIPLE
    splits = math.ceil(V / v_per_split)  # no empty slice
    m, s, t, zt = torch.empty(4, splits, N, dtype=torch.float32, device=hidden.device)
    args = (hidden, weight, targets, m, s, t, zt, N, V, H, hidden.stride(0), weight.stride(0), 1.0 / temperature,
            v_per_split)
    flags = dict(WITH_ENTROPY=with_entropy, FP32_DOT=_fp32_dot(hidden.dtype))
    if tuned:
        fwd[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), splits)](*args, **flags)
    else:
        fwd[(triton.cdiv(N, _INTERP_FWD["BLOCK_N"]), splits)](*args, **flags, **_INTERP_FWD)
    # combine the vocab slices: re-centre each slice's sums on the global max
    row_max = m.amax(0)  # [N]
    scale = torch.exp(m - row_max)  # [splits, N]
    s_all = (s * scale).sum(0)
    log_sum = torch.log(s_all)
    logp = (zt.sum(0) - row_max) - log_sum  # only the slice holding the target contributed to zt
    entropy = row_max.new_empty(0)
    if with_entropy:  # H = log s - sum e * (z - max) / s
        entropy = log_sum - (scale * (t + (m - row_max) * s)).sum(0) / s_all
    return logp, entropy, row_max, log_sum


_MM_OUT_DTYPE_OK = None  # whether torch.mm(..., out_dtype=float32) works for bf16/fp16 here (recent CUDA builds)


def fp32_output_matmul_available(device: torch.device) -> bool:
    """Whether this torch multiplies bf16 matrices into an fp32 result on `device` (else: a bf16 product)."""
    if device.type != "cuda":
        return False
    probe = torch.ones(2, 2, device=device, dtype=torch.bfloat16)
    _mm_fp32_out(probe, probe)
    return bool(_MM_OUT_DTYPE_OK)


def _mm_fp32_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for low-precision a, b with an fp32 result (no rounding of the product to bf16) where torch
    supports it, else the low-precision product."""
    global _MM_OUT_DTYPE_OK
    if _MM_OUT_DTYPE_OK is not False and a.is_cuda:
        try:
            out = torch.mm(a, b, out_dtype=torch.float32)
            _MM_OUT_DTYPE_OK = True
            return out
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE_OK = False
    return a @ b


def _vocab_tile(N: int, V: int, element_size: int) -> int:
    """Vocab tile of the backward: the [N, tile] block of d logp / d logits takes ~TRITON_BWD_TILE_BYTES.
    Fewer, wider tiles mean fewer passes of the fp32 grad_hidden accumulator ([N, H]) through memory."""
    tile = TRITON_BWD_TILE_BYTES // (element_size * max(N, 1))
    tile = max(SPLIT_MULTIPLE, tile // SPLIT_MULTIPLE * SPLIT_MULTIPLE)
    return min(tile, V)


class _TritonLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, with_entropy):
        hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
        if hidden.shape[0] == 0:
            logp, entropy, row_max, log_sum = (hidden.new_empty(0, dtype=torch.float32) for _ in range(4))
        else:
            logp, entropy, row_max, log_sum = _triton_forward(hidden, weight, targets, temperature, with_entropy)
        ctx.save_for_backward(hidden, weight, targets, row_max, log_sum)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        import triton

        hidden, weight, targets, row_max, log_sum = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        _, bwd, tuned = _kernels()
        N, H = hidden.shape
        V = weight.shape[0]
        grad_scale = (grad_logp.float() / ctx.temperature).contiguous()  # [N]
        grad_h = torch.zeros(N, H, dtype=torch.float32, device=hidden.device) if need_h else None
        grad_w = torch.empty_like(weight) if need_w else None
        tile = _vocab_tile(N, V, weight.element_size())
        g_buf = torch.empty(N, tile, dtype=weight.dtype, device=weight.device)  # [N, tile]
        for v0 in range(0, V if N else 0, tile):
            vt = min(tile, V - v0)
            g = g_buf[:, :vt]
            w_tile = weight[v0:v0 + vt]  # [vt, H]
            args = (hidden, w_tile, targets, row_max, log_sum, grad_scale, g, N, vt, H, v0, hidden.stride(0),
                    weight.stride(0), g_buf.stride(0), 1.0 / ctx.temperature)
            flags = dict(FP32_DOT=_fp32_dot(hidden.dtype))
            if tuned:
                bwd[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(vt, meta["BLOCK_V"]),)](*args, **flags)
            else:
                cfg = _INTERP_BWD
                bwd[(triton.cdiv(N, cfg["BLOCK_N"]) * triton.cdiv(vt, cfg["BLOCK_V"]),)](*args, **flags, **cfg)
            if need_w:  # one GEMM over all tokens: fp32 accumulation inside cuBLAS, no cross-chunk sum
                torch.mm(g.T, hidden, out=grad_w[v0:v0 + vt])
            if need_h:
                if g.dtype == torch.float32:
                    grad_h.addmm_(g, w_tile)
                else:
                    grad_h += _mm_fp32_out(g, w_tile)  # [N, H], summed over vocab tiles in fp32
        if need_w and N == 0:
            grad_w.zero_()
        return (grad_h.to(hidden.dtype) if need_h else None, grad_w, None, None, None)
