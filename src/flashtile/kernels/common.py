"""Shared @triton.jit helpers: the visibility rule in index form and the loop bounds it implies.

Every kernel expresses causal and sliding-window masking through one rule (FlashAttention-2,
bottom-right aligned): with off = seqlen_k - seqlen_q, key j is visible to query i iff
    j >= i + off - window_left   (when HAS_LEFT)
    j <= i + off + window_right  (when HAS_RIGHT; causal is window_right = 0)
key_phases / query_phases split the visible tiles into a masked head, an unmasked body and a masked
tail, so that only tiles crossing a mask edge (or the sequence end) pay for per-element masking. The
kernels walk them either as separate loops (plain causal forward, no mask) or as one pipelined loop
with a per-tile branch (windows, the causal backward, block-sparse lists): short loops each drain
the software pipeline, which costs more than the branch.
"""

import triton
import triton.language as tl

from flashtile import dropout

# HAS_ALIBI modes (score_log2; attention_launch._alibi_flag picks one per launch)
ALIBI_DISTANCE = tl.constexpr(1)  # -slope * |distance| per score
ALIBI_KEY_TERM = tl.constexpr(2)  # one-sided, the key term only: the caller folds the query term into lse
ALIBI_BOTH_TERMS = tl.constexpr(3)  # one-sided, key and query terms per score
ALIBI_TERM_DISTANCE = tl.constexpr(4)  # two-sided: -|key term - query term| per score, in fp32


@triton.jit
def visible(offs_m, offs_n, seqlen_q, seqlen_k, window_left, window_right,
            HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """[M, N] bool: key offs_n is visible to query offs_m (bounds on the key side included)."""
    shift = seqlen_k - seqlen_q
    vis = offs_n[None, :] < seqlen_k
    if HAS_RIGHT:
        vis = vis & (offs_n[None, :] <= offs_m[:, None] + shift + window_right)
    if HAS_LEFT:
        vis = vis & (offs_n[None, :] >= offs_m[:, None] + shift - window_left)
    return vis


@triton.jit
def key_phases(m_lo, m_hi, seqlen_q, seqlen_k, window_left, window_right,
               BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Key-tile bounds for the query rows [m_lo, m_hi).

    Returns (a, b, c, d): tiles starting in [a, b) and [c, d) need the element mask, tiles in
    [b, c) are fully visible to every row and lie wholly inside the sequence. a, b, c are
    multiples of BLOCK_N; d is the end of the visible keys (exclusive).
    """
    shift = seqlen_k - seqlen_q
    lo = 0
    hi = seqlen_k
    full_lo = 0
    full_hi = (seqlen_k // BLOCK_N) * BLOCK_N
    if HAS_RIGHT:
        hi = tl.minimum(hi, m_hi - 1 + shift + window_right + 1)
        # last key seen by the first row bounds the keys that every row sees
        full_hi = tl.minimum(full_hi, ((m_lo + shift + window_right + 1) // BLOCK_N) * BLOCK_N)
    if HAS_LEFT:
        lo = tl.maximum(lo, m_lo + shift - window_left)
        first_all = m_hi - 1 + shift - window_left  # first key seen by the last row
        full_lo = ((tl.maximum(first_all, 0) + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    hi = tl.maximum(hi, 0)
    lo = (tl.minimum(lo, hi) // BLOCK_N) * BLOCK_N
    b = tl.minimum(tl.maximum(full_lo, lo), hi)
    c = tl.minimum(tl.maximum(full_hi, b), hi)
    c = tl.maximum(c, b)
    return lo, b, c, hi


@triton.jit
def query_phases(n_lo, n_hi, seqlen_q, seqlen_k, window_left, window_right,
                 BLOCK_M: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Query-tile bounds for the key columns [n_lo, n_hi) (the mirror of key_phases).

    Returns (a, b, c, d): query tiles starting in [a, b) and [c, d) need the element mask, tiles in
    [b, c) see every key of the block and lie wholly inside the query sequence.
    """
    shift = seqlen_k - seqlen_q
    lo = 0
    hi = seqlen_q
    full_lo = 0
    full_hi = (seqlen_q // BLOCK_M) * BLOCK_M
    if HAS_RIGHT:
        # query i sees key j when i >= j - shift - window_right
        lo = tl.maximum(lo, n_lo - shift - window_right)
        first_all = n_hi - 1 - shift - window_right  # first query that sees the last key
        full_lo = ((tl.maximum(first_all, 0) + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    if HAS_LEFT:
        # query i sees key j when i <= j - shift + window_left
        hi = tl.minimum(hi, n_hi - 1 - shift + window_left + 1)
        full_hi = tl.minimum(full_hi, ((n_lo - shift + window_left + 1) // BLOCK_M) * BLOCK_M)
    hi = tl.maximum(hi, 0)
    lo = (tl.minimum(lo, hi) // BLOCK_M) * BLOCK_M
    b = tl.minimum(tl.maximum(full_lo, lo), hi)
    c = tl.minimum(tl.maximum(full_hi, b), hi)
    c = tl.maximum(c, b)
    return lo, b, c, hi


@triton.jit
def tanh(x):
    """tanh through exp2 (saturates correctly at +-inf; no libdevice, so the interpreter runs it)."""
    return 1.0 - 2.0 / (1.0 + tl.math.exp2(x * 2.8853900817779268))  # 2 * log2(e)


@triton.jit
def tanh_approx(x):
    """The GPU's tanh.approx.f32: one MUFU instruction against two (exp2 and a reciprocal) for tanh()
    above, |relative error| about 2^-11. Softcap launches use it for bf16 inputs only (SOFTCAP == 2),
    where it is 8x below the input's own rounding; the interpreter cannot run inline PTX."""
    return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                     pack=1)


@triton.jit
def fp32_fence(x):
    """x (fp32), through a register move the compiler cannot see into. tl.where(keep, p, 0.0).to(bf16)
    is otherwise rewritten by LLVM as a select of the bf16 halves after the conversion (select sinks
    below the truncation), which on sm_90 costs two PRMT extracts, two SELs and a PRMT pack per pair
    of elements instead of two FSELs (the forward's dropout loop, with the old counter hash: 659 -> 626
    SASS instructions).
    GPU only: the interpreter cannot run inline PTX."""
    return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def store_rows(base, rows, stride, cols, value, row_ok, col_limit, EVEN: tl.constexpr):
    """Store value [R, C] at base + rows * stride + cols (rows int64 [R], cols [C]) in base's element
    type, rows where row_ok; not EVEN also masks columns at col_limit (a padded head-dim chunk)."""
    mask = row_ok[:, None]
    if not EVEN:
        mask = mask & (cols[None, :] < col_limit)
    tl.store(base + rows[:, None] * stride + cols[None, :], value.to(base.dtype.element_ty), mask=mask)


@triton.jit
def load_tail(ptrs, row_mask, col_mask, ROWS: tl.constexpr, EVEN: tl.constexpr):
    """Load a head-dim tail chunk (the kernels' BLOCK_D2 / BLOCK_DV2 columns): ROWS masks the tile's
    rows (or keys) with row_mask, not EVEN its columns with col_mask; masked elements read 0."""
    if ROWS:
        if EVEN:
            return tl.load(ptrs, mask=row_mask, other=0.0)
        return tl.load(ptrs, mask=row_mask & col_mask, other=0.0)
    if EVEN:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=col_mask, other=0.0)


@triton.jit
def score_log2(qk, offs_m, cols, seqlen_q, seqlen_k, qk_scale, softcap_pre, softcap_post, alibi_log2,
               SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, am_ptrs, ATTN_MASK: tl.constexpr,
               key0=0, KEYS_FIRST: tl.constexpr = False, SCALED: tl.constexpr = True):
    """Raw q.k -> the score in the log2 domain, FlashAttention's order: scale, softcap, ALiBi.

    Without softcap: qk * softmax_scale * log2(e). With softcap c: c * tanh(qk * scale / c) * log2(e)
    (softcap_pre = scale / c, softcap_post = c * log2(e)). ALiBi adds
    -slope * |i + Sk - Sq - j| * log2(e) (alibi_log2 = slope * log2(e)), per score with
    ALIBI_DISTANCE. One-sided (ALIBI_KEY_TERM / ALIBI_BOTH_TERMS): no visible key lies right of the
    diagonal (a right edge <= 0, as causal), so the bias is slope * (j - key0) - slope * (i + Sk - Sq -
    key0) for any key0, a key term and a query term (alibi_query_term): one add per score instead of
    a distance, its absolute value and a conversion. ALIBI_BOTH_TERMS adds both here; ALIBI_KEY_TERM
    only the key term, and the caller folds the query term into lse (the backward kernels; folded into
    the forward's running max it measured slower). key0 near the tile's keys keeps both terms small
    and exact. Hidden scores get a wrong bias there; every caller masks them.
    ALIBI_TERM_DISTANCE (any window): -|key term - query term|, two fp32 adds per score where
    |distance| costs an integer subtract, an absolute value and an int-to-float conversion; key0 near
    the tile keeps the terms within slope * (|distance| + tile) of each other, so the rounding stays
    far below the bias wherever exp2 of the score is not negligible.
    KEYS_FIRST: offs_m holds keys and cols queries (dK/dV's S^T orientation).
    ATTN_MASK (torch SDPA's attn_mask, am_ptrs: pointers of this tile, in qk's orientation):
    1 = bool (False hides the key), 2 = additive float bias, added after softcap and ALiBi.
    Returns (score, t) with t = tanh(...) when SOFTCAP (the backward needs 1 - t^2), else score.
    SOFTCAP: 0 none, 1 tanh through exp2, 2 the hardware tanh.approx (tanh_approx).
    SCALED = False (no softcap): qk is returned unscaled, the caller scales it (the forward's MAX_RAW).
    """
    if SOFTCAP:
        if SOFTCAP == 2:
            t = tanh_approx(qk * softcap_pre)
        else:
            t = tanh(qk * softcap_pre)
        s = t * softcap_post
    else:
        t = qk
        s = qk * qk_scale if SCALED else qk
    if HAS_ALIBI == ALIBI_DISTANCE:
        dist = (offs_m[:, None] + (seqlen_k - seqlen_q)) - cols[None, :]
        s = s - alibi_log2 * tl.abs(dist).to(tl.float32)
    elif HAS_ALIBI != 0:  # a key term and a query term (the other modes)
        if KEYS_FIRST:  # the arguments' roles are swapped: seqlen_q holds Sk and seqlen_k Sq
            key_term = (alibi_log2 * (offs_m - key0).to(tl.float32))[:, None]
            query_term = alibi_query_term(cols, seqlen_k, seqlen_q, alibi_log2, key0)[None, :]
        else:
            key_term = (alibi_log2 * (cols - key0).to(tl.float32))[None, :]
            query_term = alibi_query_term(offs_m, seqlen_q, seqlen_k, alibi_log2, key0)[:, None]
        if HAS_ALIBI == ALIBI_TERM_DISTANCE:
            s = s - tl.abs(key_term - query_term)
        else:
            s = s + key_term
            if HAS_ALIBI == ALIBI_BOTH_TERMS:
                s = s - query_term
    if ATTN_MASK != 0:
        in_bounds = (offs_m[:, None] < seqlen_q) & (cols[None, :] < seqlen_k)
        am = tl.load(am_ptrs, mask=in_bounds, other=0)
        if ATTN_MASK == 1:
            s = tl.where(am != 0, s, float("-inf"))
        else:
            s = s + am.to(tl.float32) * 1.4426950408889634
    return s, t


@triton.jit
def alibi_query_term(queries, seqlen_q, seqlen_k, alibi_log2, key0):
    """slope * log2(e) * (i + Sk - Sq - key0) per query i: score_log2's query term. The one-sided
    score of ALIBI_KEY_TERM leaves it out; the true score is that score minus this."""
    return alibi_log2 * (queries + (seqlen_k - seqlen_q) - key0).to(tl.float32)


@triton.jit
def score_params(Alibi, b, h, stride_alibi_b, softmax_scale, softcap, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """(qk_scale, softcap_pre, softcap_post, alibi_log2) for common.score_log2, for query head h."""
    softcap_pre = 0.0
    if SOFTCAP:
        softcap_pre = softmax_scale / softcap
    alibi_log2 = 0.0
    if HAS_ALIBI:
        alibi_log2 = tl.load(Alibi + b * stride_alibi_b + h).to(tl.float32) * 1.4426950408889634
    return softmax_scale * 1.4426950408889634, softcap_pre, softcap * 1.4426950408889634, alibi_log2


@triton.jit
def sequence_bounds(CuSeqQ, CuSeqK, b, seqlen_q, seqlen_k, VARLEN: tl.constexpr):
    """(q_start, k_start, seqlen_q, seqlen_k) of sequence b.

    VARLEN: rows CuSeqQ[b]:CuSeqQ[b+1] of the packed tensors (keys: CuSeqK); otherwise the batch
    dimension separates sequences and every sequence has the full (maximum) lengths.
    """
    q_start = b * 0
    k_start = b * 0
    if VARLEN:
        q_start = tl.load(CuSeqQ + b)
        seqlen_q = tl.load(CuSeqQ + b + 1) - q_start
        k_start = tl.load(CuSeqK + b)
        seqlen_k = tl.load(CuSeqK + b + 1) - k_start
    return q_start, k_start, seqlen_q, seqlen_k


@triton.jit
def block_list(Num, Idx, row, block, n_blocks_per_row, n_entries):
    """(count, idx_base) of one block-sparse list: entries Idx[idx_base + i] for i < count.

    Lists are [rows, n_blocks_per_row] (counts) and [rows, n_blocks_per_row, n_entries] (indices),
    row = b * mask_b + h * mask_h (0 multipliers broadcast a BlockMask over batch or heads).
    """
    slot = row.to(tl.int64) * n_blocks_per_row + block
    return tl.load(Num + slot), slot * n_entries


@triton.jit
def dropout_head_row(b, h, heads_q, count_q):
    """Row number of head (b, h)'s first query row, ((b * Hq + h) * Sq), as uint32 (api.py keeps
    B * Hq * Sq <= 2^32 under dropout; Sq is the maximum length: varlen uses FlashAttention's padded
    pattern)."""
    return (((b * heads_q + h).to(tl.int64) * count_q) & 0xFFFFFFFF).to(tl.uint32)


# dropout.py's multipliers: the row key's, the mixer's first, and both in one (mod 2^32)
DROP_ROW = tl.constexpr(dropout.ROW_MULT)
DROP_MIX_1 = tl.constexpr(dropout.MIX_MULT_1)
DROP_ROW_MIX_1 = tl.constexpr(dropout.ROW_MULT * dropout.MIX_MULT_1 % 2**32)


@triton.jit
def dropout_row_keys(head_row, rows, seed_hi, salt):
    """The keys of query rows ``rows`` (int32 [M], within the head whose first row is head_row, from
    dropout_head_row), as dropout_keep takes them: (dropout.py's row_key + salt) * MIX_MULT_1, uint32.

    The element hash mixes k_r + j + seed_lo, whose first step multiplies by MIX_MULT_1, so the kernels
    multiply the row part and the key part apart and add them per element: one add where the sum and
    the multiply cost two. seed_lo can sit on either side: the forward and dQ kernels, whose rows are
    fixed per program, pass salt = seed_lo; the dK/dV kernels, whose key columns are fixed, pass
    salt = 0 and put seed_lo into the key part (dropout_col_keys), once. A row's key is one
    multiply-add, rows * (ROW_MULT * MIX_MULT_1) + ((head_row + seed_hi) * ROW_MULT + salt) * MIX_MULT_1,
    the second term uniform across the program: one IMAD a row where dK/dV recomputes its query rows'
    keys on every tile (16 rows per thread at 64 x 64), on the row numbers it holds anyway."""
    base = tl.zeros(rows.shape, tl.uint32) + head_row + seed_hi  # uint32 arithmetic
    base = (base * tl.full(rows.shape, DROP_ROW, tl.uint32) + salt) * tl.full(rows.shape, DROP_MIX_1, tl.uint32)
    return rows.to(tl.uint32) * tl.full(rows.shape, DROP_ROW_MIX_1, tl.uint32) + base


@triton.jit
def dropout_col_keys(cols, salt):
    """The key part of the element hash for key indices ``cols`` (int32, any shape): (cols + salt) *
    MIX_MULT_1 in uint32; salt = seed_lo where the row keys do not carry it (dropout_row_keys)."""
    return (tl.cast(cols, tl.uint32) + salt) * DROP_MIX_1.value


@triton.jit
def dropout_tile_keep(row_keys, start_n, offs_n, threshold):
    """Keep bits of a [queries, keys] tile whose keys are start_n + offs_n (offs_n the same on every
    tile): the tile's offset joins the row keys (one add a row), so the keys' part stays loop-invariant
    and each element pays one add for both parts."""
    return dropout_keep(row_keys + dropout_col_keys(start_n, 0), dropout_col_keys(offs_n, 0), threshold, False)


@triton.jit
def attn_mask_ptrs(AttnMask, b, h, queries, keys, stride_amb, stride_amh, stride_amm, stride_amn):
    """Pointers of torch SDPA's attn_mask at head (b, h) through its [B, Hq, Sq, Sk] broadcast strides
    (0 where it broadcasts). The tile takes the shape of queries + keys: queries [M, 1] and keys
    [1, N] for a [queries, keys] tile, the transposes for the dK/dV kernels' [keys, queries] tiles."""
    return (AttnMask + b.to(tl.int64) * stride_amb + h.to(tl.int64) * stride_amh
            + queries.to(tl.int64) * stride_amm + keys.to(tl.int64) * stride_amn)


@triton.jit
def dropout_keep(row_keys, col_keys, threshold, KEYS_FIRST: tl.constexpr):
    """Keep bits of one score tile (dropout.py: keep_bits).

    row_keys: uint32 [M], the tile's query rows' keys (dropout_row_keys); col_keys: uint32, 1-d, the
    tile's keys' parts (dropout_col_keys), in runs of 16 from a multiple of 16 (the pairing below reads
    positions, not values). KEYS_FIRST = False: tile [queries, keys]; True: tile [keys, queries] (the
    dK/dV kernels').

    Element (i, j)'s bits are mix(k_i + (j & ~8) + seed_lo), mix being lowbias32 without its first
    xorshift; its first multiply is already in both parts, so per element: one add, a xorshift, a
    multiply, a xorshift and a compare; no 64-bit counter or carry. One 32-bit hash serves keys j and
    j + 8 (bit 3 of j clear; 16 bits each): half the integer work of one hash per key. The pair is j,
    j + 8 rather than j, j + 1 because the tensor cores' result layout gives a thread the elements
    (row, col) and (row + 8, col) as well as (row, col + 8): so both orientations find a pair in one
    thread's registers, while a pair of neighbouring rows of the transposed tile sits in two threads
    and cost the dK/dV loop a conversion through shared memory.
    """
    N: tl.constexpr = col_keys.shape[0]
    low, _ = tl.split(tl.permute(tl.reshape(col_keys, (N // 16, 2, 8)), (0, 2, 1)))  # keys with bit 3 clear
    low = tl.reshape(low, (N // 2,))
    M: tl.constexpr = row_keys.shape[0]
    if KEYS_FIRST:
        x = row_keys[None, :] + low[:, None]  # [N / 2, M]
    else:
        x = row_keys[:, None] + low[None, :]  # [M, N / 2]
    x = x ^ (x >> 15)
    x = x * tl.full(x.shape, 0x846CA68B, tl.uint32)
    x = x ^ (x >> 16)
    if KEYS_FIRST:
        x = tl.reshape(x, (N // 16, 8, M))
        halves = tl.reshape(tl.permute(tl.join(x & 0xFFFF, x >> 16), (0, 3, 1, 2)), (N, M))
    else:
        x = tl.reshape(x, (M, N // 16, 8))
        halves = tl.reshape(tl.permute(tl.join(x & 0xFFFF, x >> 16), (0, 1, 3, 2)), (M, N))
    return halves >= threshold.to(tl.uint32)


@triton.jit
def program_tile(ProgramOrder, n_tiles, BLOCK_SPARSE: tl.constexpr, TILE_MAJOR: tl.constexpr,
                 HEAD_GROUP: tl.constexpr, HAS_RIGHT: tl.constexpr, QUERY_TILES: tl.constexpr):
    """(tile, bh) of this program: its tile of n_tiles and its row of the batch x head grid.

    BLOCK_SPARSE: the launch order comes from ProgramOrder (masks.BlockMask.program_order, heaviest
    block lists first: a long list started last would run alone at the end of the grid).
    TILE_MAJOR: tiles first, heaviest tiles first (attention_launch.program_order), inside groups of
    HEAD_GROUP rows (0: one group of every row). Head-major order starts the last head's heaviest
    causal tile near the end of the grid, where it runs alone; groups of a few heads keep those
    heads' tensors in L2 while their heavy tiles start first.
    Otherwise head-major, so the programs running together share one head's tensors in L2.
    QUERY_TILES: programs own query tiles (forward, dQ), whose later tiles see more keys under causal
    (heavy last, so they are reversed); key tiles (dK/dV) are heavy first already.
    """
    pid = tl.program_id(0)
    if BLOCK_SPARSE:
        pid = tl.load(ProgramOrder + pid)
    if TILE_MAJOR:
        n_bh = tl.num_programs(0) // n_tiles
        if HEAD_GROUP == 0:
            tile = pid // n_bh
            bh = pid % n_bh
        else:
            group = pid // (HEAD_GROUP * n_tiles)
            rank = pid % (HEAD_GROUP * n_tiles)
            rows = tl.minimum(n_bh - group * HEAD_GROUP, HEAD_GROUP)  # the last group may be smaller
            tile = rank // rows
            bh = group * HEAD_GROUP + rank % rows
        if QUERY_TILES:
            tile = n_tiles - 1 - tile
    else:
        tile = pid % n_tiles
        bh = pid // n_tiles
        if QUERY_TILES and HAS_RIGHT and not BLOCK_SPARSE:
            tile = n_tiles - 1 - tile
    return tile, bh


@triton.jit
def list_tile(Idx, base, i, TILES_PER_BLOCK: tl.constexpr, TILE: tl.constexpr, BLOCK: tl.constexpr):
    """Tile i of a block-sparse list walked as one flat loop of TILES_PER_BLOCK tiles per listed block.

    Returns (entry, part, first): the list entry (Idx + entry holds the block index), the tile's
    offset inside its block and the tile's first row / column in the sequence.
    """
    entry = base + i // TILES_PER_BLOCK
    part = (i % TILES_PER_BLOCK) * TILE
    return entry, part, tl.load(Idx + entry) * BLOCK + part


ELEM_TILE = tl.constexpr(1)  # ELEM: a partial block's element mask is a uint8 [BLOCK_SQ, BLOCK_SK] tile
ELEM_INTERVALS = tl.constexpr(2)  # ... or one key interval per query row, int64 [BLOCK_SQ] (BLOCK_SPARSE 3)


@triton.jit
def partial_local(rows, cols, BLOCK_SK: tl.constexpr, ELEM: tl.constexpr):
    """Offsets of a kernel tile's element-mask entries inside its partial block's entry, for local
    query rows `rows` [M] and local key columns `cols` [N]: ELEM_TILE [M, N] bytes of the uint8 tile;
    ELEM_INTERVALS the [M] rows' intervals (keys are compared, not loaded)."""
    if ELEM == ELEM_INTERVALS:
        return rows
    else:
        return rows[:, None] * BLOCK_SK + cols[None, :]


@triton.jit
def row_tile_ptrs(Tiles, first_tile, i, TILES_PER_BLOCK: tl.constexpr, offset, em_local, BLOCK_SQ: tl.constexpr,
                  BLOCK_SK: tl.constexpr, ELEM: tl.constexpr):
    """Pointers of kernel tile i of a partial-block list inside its element-mask entry: a query-block
    row's partial blocks are numbered consecutively in list order (masks.BlockMask.partial_kv_tile:
    the forward and dQ walks), and so are a key-block column's intervals (partial_q_interval: the
    dK/dV walk), so the entry follows from first_tile, the list's first entry, loaded once before the
    loop. Loading the number per tile (partial_tile_ptrs) made Triton 3.6's
    pipeliner single-buffer the loop: one stage and a wait for every copy at each tile (sm_90 TTGIR),
    where this form keeps its three stages (H200, 8-document mask: forward 243 -> 230 us, dQ 306-308
    -> 298-301)."""
    tile = first_tile + i // TILES_PER_BLOCK
    return Tiles + tile.to(tl.int64) * (BLOCK_SQ * (BLOCK_SK if ELEM == ELEM_TILE else 1)) + offset + em_local


@triton.jit
def partial_tile_ptrs(Tiles, TileIdx, entry, offset, em_local, BLOCK_SQ: tl.constexpr, BLOCK_SK: tl.constexpr):
    """Pointers of a kernel tile inside the uint8 element-mask tile of block-list entry `entry`
    (masks.BlockMask.partial_tiles: [P, BLOCK_SQ, BLOCK_SK]; TileIdx + entry holds its index): offset
    is the kernel tile's first element in it, em_local the tile's offsets (partial_local). The dK/dV
    walk uses it: a key-block column's partial tiles are not consecutive, and there the loaded index
    ran faster than a register load of the tile by a computed address (416 against 427 us on the
    8-document mask; 417-419 against 430 with a key-major copy of the tiles)."""
    tile = tl.load(TileIdx + entry)
    return Tiles + tile.to(tl.int64) * (BLOCK_SQ * BLOCK_SK) + offset + em_local


ALL_KEYS = tl.constexpr(0x7FFFFFFF << 32)  # the interval lo = 0, hi = 2^31 - 1: every key


@triton.jit
def row_walk(Num, Idx, PNum, PIdx, TileIdx, row, q_block, n_q_blocks, n_k_blocks, offs_m, offs_n,
             BLOCK_SQ: tl.constexpr, BLOCK_SK: tl.constexpr, ELEM: tl.constexpr):
    """Set-up of a query-block row's walk over one block list (Num / Idx) in the forward and dQ
    kernels. ELEM_INTERVALS walks that list (full blocks) and then PNum / PIdx's (partial ones) in one
    loop (merged_row_tile). Returns (blocks to walk, the list's base, n_full, the partial list's
    base, the row's first element-mask entry, em_local: the tile's rows / elements in an entry)."""
    count, base = block_list(Num, Idx, row, q_block, n_q_blocks, n_k_blocks)
    em_local = partial_local(offs_m % BLOCK_SQ, offs_n, BLOCK_SK, ELEM)
    n_full, p_base = count, base
    if ELEM == ELEM_INTERVALS:
        p_count, p_base = block_list(PNum, PIdx, row, q_block, n_q_blocks, n_k_blocks)
        count = count + p_count
    first_entry = 0
    if ELEM:  # this row's partial entries are consecutive (row_tile_ptrs)
        first_entry = tl.load(TileIdx + p_base)
    return count, base, n_full, p_base, first_entry, em_local


@triton.jit
def merged_row_tile(Idx, base, PIdx, p_base, n_full, Intervals, first_entry, em_local, i, full_lo, full_hi,
                    TILES_PER_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SQ: tl.constexpr,
                    BLOCK_SK: tl.constexpr):
    """Key tile i of a merged row walk (BLOCK_SPARSE 3, row_walk): the n_full blocks of the full list
    (Idx + base), then those of the partial list (PIdx + p_base), in one pipelined loop. A partial
    list walked as a second loop ran two to six tiles per row, each loop filling and draining its own
    software pipeline (H200, 8-document mask: dQ 296 -> 255 us merged).

    Returns (start_n, em, need_vis): the tile's first key; its rows' key intervals (and_element_mask's
    em: the partial block's, masks.BlockMask.partial_intervals, or every key in a full block); and
    whether it needs the per-element rule (a partial block, or a full one crossing key_phases'
    [full_lo, full_hi))."""
    blk = i // TILES_PER_BLOCK
    is_part = blk >= n_full
    p_pos = tl.maximum(blk - n_full, 0)  # 0 in full blocks, so that the interval address stays valid
    block = tl.load(tl.where(is_part, PIdx + p_base + p_pos, Idx + base + blk))
    start_n = block * BLOCK_SK + (i % TILES_PER_BLOCK) * BLOCK_N
    em = tl.where(is_part, tl.load(Intervals + (first_entry + p_pos).to(tl.int64) * BLOCK_SQ + em_local), ALL_KEYS)
    need_vis = is_part | (start_n < full_lo) | (start_n + BLOCK_N > full_hi)
    return start_n, em, need_vis


@triton.jit
def and_element_mask(vis, em, keys, ELEM: tl.constexpr):
    """vis [M, N] (queries by keys) ANDed with a partial block's element mask, as loaded from its
    entry: ELEM_TILE em [M, N] bytes; ELEM_INTERVALS em [M] int64 lo + (hi << 32), row i seeing the
    absolute keys lo <= j < hi (keys [N]; merged_row_tile)."""
    if ELEM == ELEM_INTERVALS:
        lo = em.to(tl.int32)
        hi = (em >> 32).to(tl.int32)
        return vis & (keys[None, :] >= lo[:, None]) & (keys[None, :] < hi[:, None])
    else:
        return vis & (em != 0)


@triton.jit
def online_softmax(qk, m_i, l_i, GUARD: tl.constexpr, RAW: tl.constexpr = False, scale=None):
    """One online-softmax step on log2-domain scores qk [M, N]: returns (p, alpha, l_i, m_new).

    alpha rescales what was accumulated under the old running max m_i. GUARD: some rows may have
    seen only -inf so far (masked scores); they keep m = -inf and subtract 0, so p = 0, not NaN.
    RAW: the scores are qk * scale (scale > 0), qk unscaled: the scale multiplies each row's max, not
    every score. Rounding is monotone, so max(qk) * scale is exactly max(qk * scale), and
    qk * scale - m is one FMA (the scaled form costs a multiply a score for the max, then the FMA).
    """
    if RAW:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * scale)
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1))
    if GUARD:
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_sub = m_new
    if RAW:
        p = tl.math.exp2(qk * scale - m_sub[:, None])
    else:
        p = tl.math.exp2(qk - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    return p, alpha, l_i * alpha + tl.sum(p, 1), m_new
