"""@triton.jit kernels of the GEMM family: MXFP4 GEMM (dense and grouped), FP8 block GEMM, FP8 activation quantiser.

Launch logic (block sizes, grids, paths, dtype choices) lives in ``dsv4rt.backends.cuda.gemm``; see its module
docstring for the design. Conventions shared by every kernel here:

* Packed E2M1 weights, E8M0 scales and E4M3 weights arrive as uint8 (the launcher views them), and are decoded
  in registers with integer bit operations (``kernels.decode``: no FP8 type, no look-up tables, nothing
  dequantised is written to memory), so every kernel compiles for sm_80 and later.
* ``DOT`` is the operand dtype of the tensor-core product (``tl.bfloat16``, ``tl.float16`` or ``tl.float32``
  = TF32 on NVIDIA, HF32 on Ascend: ``DOT_PREC``, chosen by the launcher per target); accumulation is
  always float32. ``INTERP`` (constexpr) is set under the Triton interpreter, whose
  ``tl.dot`` multiplies the raw uint16 bits of bfloat16 operands: there the (exactly representable) bf16
  operands are widened to fp32 just before the product, so every conversion of the GPU path still runs.
* Grouped GEMMs use one launch: program axis 0 walks an upper bound of the (expert, row-tile) schedule, which
  each program derives from ``offsets`` on the device (:func:`_expert_tile`); programs past the end exit.
"""
import triton
import triton.language as tl

from .decode import e2m1_to_f32, e4m3_to_f32, e8m0_to_f32
from .rounding import round_to


@triton.jit
def _mma(a, b, acc, DOT: tl.constexpr, INTERP: tl.constexpr, DOT_PREC: tl.constexpr):
    """acc + a[M, K] @ b[K, N] with DOT operands and a float32 accumulator. DOT_PREC: input_precision of
    the float32 product ("tf32" on NVIDIA and the interpreter, "hf32" on Ascend, which refuses "tf32")."""
    if INTERP and DOT == tl.bfloat16:
        # the interpreter cannot multiply bf16, and its fp32 -> bf16 cast flushes subnormals (a weight of
        # E8M0 byte 0 or 1 lost 5-25% of the product): round on the bits as the GPU's cast does and keep
        # the (exact) bf16 values in fp32
        a = a.to(tl.float32)
        b = b.to(tl.float32)
        a = tl.where(a == a, round_to(a, 1), a)
        b = tl.where(b == b, round_to(b, 1), b)
    else:
        a = a.to(DOT)
        b = b.to(DOT)
    if DOT == tl.float32:
        return tl.dot(a, b, acc, input_precision=DOT_PREC)
    return tl.dot(a, b, acc)


@triton.jit
def _out(v, ptr, INTERP: tl.constexpr):
    """float32 v cast to ptr's element type. The interpreter's fp32 -> bf16 cast truncates and mangles
    subnormals; there the value is rounded to nearest-even on the bits (as the GPU's cast does) and the
    upper 16 bits are reinterpreted as bf16."""
    if INTERP:
        if ptr.dtype.element_ty == tl.bfloat16:
            b = v.to(tl.uint32, bitcast=True)
            b = tl.where(v == v, (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000, 0x7FC00000)
            return (b >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return v.to(ptr.dtype.element_ty)


@triton.jit
def _expert_tile(off_ptr, t, E, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr):
    """Tile ``t`` of the grouped schedule -> (expert, first row, end row).

    Expert e owns ceil(rows_e / BLOCK_M) consecutive tiles; tiles are numbered expert by expert (empty experts
    own none). The expert is found by a prefix sum of the per-expert tile counts over the whole ``offsets``
    vector (E <= a few hundred: one small load per program). ``expert >= E`` means t is past the last tile.
    """
    i = tl.arange(0, BLOCK_E)
    lo = tl.load(off_ptr + i, mask=i < E, other=0)
    hi = tl.load(off_ptr + i + 1, mask=i < E, other=0)
    tiles = (tl.maximum(hi - lo, 0) + BLOCK_M - 1) // BLOCK_M
    ends = tl.cumsum(tiles, 0)
    e = tl.sum((ends <= t).to(tl.int32), 0)
    sel = i == e
    start = tl.sum(tl.where(sel, ends - tiles, 0), 0)
    row0 = tl.sum(tl.where(sel, lo, 0), 0) + (t - start) * BLOCK_M
    row1 = tl.sum(tl.where(sel, hi, 0), 0)
    return e, row0, row1


@triton.jit
def fp4_gemm_kernel(x_ptr, w_ptr, s_ptr, y_ptr, off_ptr, M, N, K, E,
                    sxm, sxk, swe, swn, swk, sse, ssn, ssk, sys, sym,
                    GROUPED: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, K_STEPS: tl.constexpr, EVEN_K: tl.constexpr, EVEN_ODD: tl.constexpr,
                    DOT: tl.constexpr, INTERP: tl.constexpr, DOT_PREC: tl.constexpr):
    """y[rows, n] (+)= x[rows, k] * E2M1(w[e, n, k]) * 2^(s[e, n, k/32] - 127) over this program's K split.

    Grid: (row tiles * cdiv(N, BLOCK_N), splits), N-blocks fastest. Program (t, j, p) computes the rows of tile
    t (of expert e when GROUPED) and columns j*BLOCK_N.. over K_STEPS steps of BLOCK_K from k = p*K_STEPS*BLOCK_K
    (a constexpr count: Triton 3.6's interpreter cannot loop over run-time bounds with NumPy 2.4), and stores
    float32 partials at ``y + p*sys`` when split (sys = 0 otherwise: the final output, in y's dtype).
    The weight tile is loaded as [BLOCK_N, BLOCK_K/32, 16] bytes (one E8M0 scale per 16 bytes, so scales are
    loaded once per 32-block and broadcast) and unpacked and scaled in registers.
    EVEN_ODD (decode path): two products x[:, even k] @ lo-nibbles + x[:, odd k] @ hi-nibbles, so the weight
    needs no interleaving (x is tiny and cached). Otherwise (prefill path) the nibbles are interleaved with
    join/reshape into one [BLOCK_N, BLOCK_K] operand and x is loaded as contiguous rows.
    """
    n_blocks = tl.cdiv(N, BLOCK_N)
    t = tl.program_id(0) // n_blocks  # N-blocks vary fastest: a row tile's x stays in L2 while all of N runs
    pid_n = tl.program_id(0) % n_blocks
    pid_k = tl.program_id(1)
    if GROUPED:
        e, row0, row1 = _expert_tile(off_ptr, t, E, BLOCK_E, BLOCK_M)
    else:
        e = t * 0
        row0 = t * BLOCK_M
        row1 = M
    if e < E:
        rm = row0 + tl.arange(0, BLOCK_M)
        m_ok = (rm < row1) & (rm < M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        x_rows = x_ptr + rm.to(tl.int64)[:, None] * sxm
        w_rows = w_ptr + e.to(tl.int64) * swe + rn.to(tl.int64)[:, None, None] * swn
        s_rows = s_ptr + e.to(tl.int64) * sse + rn.to(tl.int64)[:, None] * ssn
        g = tl.arange(0, BLOCK_K // 32)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for step in range(0, K_STEPS):
            k0 = (pid_k * K_STEPS + step) * BLOCK_K
            kg = k0 // 32 + g  # 32-wide K blocks of this step (one E8M0 scale each)
            kb = kg[:, None] * 16 + tl.arange(0, 16)[None, :]  # their packed bytes [G, 16]
            if EVEN_K:
                wmask = n_ok[:, None, None]
                smask = n_ok[:, None]
            else:
                wmask = n_ok[:, None, None] & (kg < K // 32)[None, :, None]
                smask = n_ok[:, None] & (kg < K // 32)[None, :]
            wb = tl.load(w_rows + kb[None, :, :] * swk, mask=wmask, other=0).to(tl.int32)  # [BN, G, 16]
            sc = e8m0_to_f32(tl.load(s_rows + kg[None, :] * ssk, mask=smask, other=127).to(tl.int32))
            lo = e2m1_to_f32(wb & 15) * sc[:, :, None]
            hi = e2m1_to_f32(wb >> 4) * sc[:, :, None]
            if EVEN_ODD:
                kx = k0 + 2 * tl.arange(0, BLOCK_K // 2)
                xmask = m_ok[:, None] & (kx < K)[None, :]
                xe = tl.load(x_rows + kx[None, :] * sxk, mask=xmask, other=0.0)
                xo = tl.load(x_rows + (kx + 1)[None, :] * sxk, mask=xmask, other=0.0)
                acc = _mma(xe, tl.trans(tl.reshape(lo, (BLOCK_N, BLOCK_K // 2))), acc, DOT, INTERP, DOT_PREC)
                acc = _mma(xo, tl.trans(tl.reshape(hi, (BLOCK_N, BLOCK_K // 2))), acc, DOT, INTERP, DOT_PREC)
            else:
                kk = k0 + tl.arange(0, BLOCK_K)
                if EVEN_K:
                    xt = tl.load(x_rows + kk[None, :] * sxk, mask=m_ok[:, None], other=0.0)
                else:
                    xt = tl.load(x_rows + kk[None, :] * sxk, mask=m_ok[:, None] & (kk < K)[None, :], other=0.0)
                w = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))
                acc = _mma(xt, tl.trans(w), acc, DOT, INTERP, DOT_PREC)
        y = y_ptr + pid_k.to(tl.int64) * sys + rm.to(tl.int64)[:, None] * sym + rn[None, :]
        tl.store(y, _out(acc, y_ptr, INTERP), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def fp8_gemm_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K,
                    sxm, sxk, swn, swk, ssn, ssk, sys, sym,
                    SCALE_E8M0: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    K_STEPS: tl.constexpr, EVEN_K: tl.constexpr, DOT: tl.constexpr, INTERP: tl.constexpr,
                    DOT_PREC: tl.constexpr, SCALE_BLOCK: tl.constexpr = 128):
    """y[m, n] (+)= sum_k x[m, k] * E4M3(w[n, k]) * s[n // SB, k // SB] over this program's K split (SB =
    SCALE_BLOCK: 128 for V4, 32 for V4.1).

    Grid: (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), splits), N-blocks fastest; K_STEPS per split as in fp4_gemm_kernel.
    BLOCK_K divides SB, so each K step lies in one scale column and its scale multiplies the float32 partial
    product (the official kernel's ``acc += (A_kb . W_kb^T) * sa * sw``). SB = 128: BLOCK_N divides 128 too, so
    the scale is one scalar per step; SB = 32: one scale per output column (row block n // 32) per step, loaded
    as a [BLOCK_N] vector. Edge blocks (N, K not multiples of SB) are masked.
    """
    n_blocks = tl.cdiv(N, BLOCK_N)
    pid_m = tl.program_id(0) // n_blocks
    pid_n = tl.program_id(0) % n_blocks
    pid_k = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rm < M
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * sxm
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * swn
    if SCALE_BLOCK == 128:
        s_row = s_ptr + ((pid_n * BLOCK_N) // 128) * ssn
    else:
        s_cols = s_ptr + (rn // SCALE_BLOCK).to(tl.int64) * ssn   # [BLOCK_N]: the scale row of each column
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(0, K_STEPS):
        k0 = (pid_k * K_STEPS + step) * BLOCK_K
        kk = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            xt = tl.load(x_rows + kk[None, :] * sxk, mask=m_ok[:, None], other=0.0)
            wb = tl.load(w_rows + kk[None, :] * swk, mask=n_ok[:, None], other=0)
        else:
            xt = tl.load(x_rows + kk[None, :] * sxk, mask=m_ok[:, None] & (kk < K)[None, :], other=0.0)
            wb = tl.load(w_rows + kk[None, :] * swk, mask=n_ok[:, None] & (kk < K)[None, :], other=0)
        w = e4m3_to_f32(wb)
        part = _mma(xt, tl.trans(w), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), DOT, INTERP, DOT_PREC)
        if SCALE_BLOCK == 128:
            if SCALE_E8M0:
                sc = e8m0_to_f32(tl.load(s_row + (k0 // 128) * ssk).to(tl.int32))
            else:
                sc = tl.load(s_row + (k0 // 128) * ssk).to(tl.float32)
            acc += part * sc
        else:
            if SCALE_E8M0:
                sv = e8m0_to_f32(tl.load(s_cols + (k0 // SCALE_BLOCK) * ssk, mask=n_ok, other=127).to(tl.int32))
            else:
                sv = tl.load(s_cols + (k0 // SCALE_BLOCK) * ssk, mask=n_ok, other=1.0).to(tl.float32)
            acc += part * sv[None, :]
    y = y_ptr + pid_k.to(tl.int64) * sys + rm.to(tl.int64)[:, None] * sym + rn[None, :]
    tl.store(y, _out(acc, y_ptr, INTERP), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def split_sum_kernel(ws_ptr, y_ptr, total, SPLIT: tl.constexpr, BLOCK: tl.constexpr, INTERP: tl.constexpr):
    """y[i] = sum over p of ws[p, i] (float32, fixed order: deterministic), cast to y's dtype."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < total
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for p in tl.static_range(SPLIT):
        acc += tl.load(ws_ptr + p * total + i, mask=ok, other=0.0)
    tl.store(y_ptr + i, _out(acc, y_ptr, INTERP), mask=ok)


@triton.jit
def act_quant_kernel(x_ptr, q_ptr, s_ptr, M, K, sxm, sxk, sqm, ssm,
                     FOLD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK: tl.constexpr = 128):
    """Per row and 1 x BLOCK K block (128 V4, 32 V4.1): s = 2^ceil(log2(max(amax, 1e-4) * fp32(1/448))),
    q = E4M3-RNE(clamp(x/s, 448)).

    Bit-identical to dsv4rt.formats.act_quant_fp8: the ceil-log2 is taken from the float32 bits, x/s is an
    exact power-of-two multiply, and round-to-nearest-even onto the E4M3 grid uses the 2^23 trick on the
    scaled magnitude. A block holding Inf gets s = Inf, one holding NaN s = NaN, and q = x / s there (as
    formats does), so q * s is NaN over the block. FOLD: store q * s (exact in bf16) into q [M, K]; else
    store q into q (float32) and s into s [M, ceil(K/BLOCK)] float32. Grid: (cdiv(M, BLOCK_R),
    ceil(K/BLOCK)).
    """
    rm = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    kb = tl.program_id(1)
    rk = kb * BLOCK + tl.arange(0, BLOCK)
    mask = (rm < M)[:, None] & (rk < K)[None, :]
    x = tl.load(x_ptr + rm.to(tl.int64)[:, None] * sxm + rk[None, :] * sxk, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)
    # 0: a finite block, 1: it holds +-Inf, >= 2: it holds NaN (GPU max reductions may drop NaN: counted apart)
    kind = tl.max((tl.abs(x) > 3.4028234663852886e38).to(tl.int32) + 2 * (x != x).to(tl.int32), axis=1)
    y = tl.maximum(amax, 1e-4) * 0.0022321429569274187  # float32(1 / 448), exactly
    bits = y.to(tl.int32, bitcast=True)
    b = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
    b = tl.minimum(b, 253)  # finite amax gives b <= 247; the clamp keeps 1/s a normal power of two
    # a non-finite block as formats.act_quant_fp8 has it: s = Inf (Inf in the block) or NaN, q = x / s
    # (0, or NaN for the Inf / NaN entries), so q * s is NaN over the whole block
    s = tl.where(kind == 0, (b << 23).to(tl.float32, bitcast=True), tl.where(kind == 1, float("inf"), float("nan")))
    inv = tl.where(kind == 0, ((254 - b) << 23).to(tl.float32, bitcast=True), tl.where(kind == 1, 0.0, float("nan")))
    q = x * inv[:, None]
    a = tl.minimum(tl.abs(q), 448.0, propagate_nan=tl.PropagateNan.ALL)  # NaN x stays NaN
    ea = tl.maximum(((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
    step = ((ea + 124) << 23).to(tl.float32, bitcast=True)  # 2^(ea - 3): E4M3 spacing at a's binade
    inv_step = ((130 - ea) << 23).to(tl.float32, bitcast=True)
    r = ((a * inv_step + 8388608.0) - 8388608.0) * step  # RNE to an integer multiple of step
    sign = (q.to(tl.int32, bitcast=True) >> 31) << 31  # copied by bits: keeps -0.0 (as the reference does)
    r = (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    if FOLD:
        tl.store(q_ptr + rm.to(tl.int64)[:, None] * sqm + rk[None, :], (r * s[:, None]).to(q_ptr.dtype.element_ty),
                 mask=mask)
    else:
        tl.store(q_ptr + rm.to(tl.int64)[:, None] * sqm + rk[None, :], r.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + rm.to(tl.int64) * ssm + kb, s, mask=rm < M)
