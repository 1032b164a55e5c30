"""Block-sparse masks: masks.BlockMask (data structure, builders, index lists) and the tiled CPU path
with ``block_mask=`` against the oracle ``reference.attention_ref(block_mask=...)``.

Tolerance: FlashAttention's rule (reference.check_close), factor 2 for out / lse, 3 for gradients.
Mask blocks are small ((16, 16), (32, 16), ...) and sequence lengths are not multiples of them, so
every test has cropped edge blocks; the CPU path also runs with small tiles and one-batch chunks.
"""

from __future__ import annotations

import dataclasses
import math
import zlib

import pytest
import torch

from flashtile import cpu
from flashtile.masks import BlockMask, visibility_mask
from flashtile.reference import attention_ref
from oracle import assert_results_match_oracle

NEG_INF = float("-inf")


def _gen(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()))


def _kind_by_loops(mask4: torch.Tensor, bq: int, bk: int) -> torch.Tensor:
    """The definition, block by block: 0 nothing visible, 2 every in-range element visible, else 1."""
    nb, nh, sq, sk = mask4.shape
    nq, nk = math.ceil(sq / bq), math.ceil(sk / bk)
    kind = torch.empty(nb, nh, nq, nk, dtype=torch.int8)
    for b in range(nb):
        for h in range(nh):
            for i in range(nq):
                for j in range(nk):
                    blk = mask4[b, h, i * bq : (i + 1) * bq, j * bk : (j + 1) * bk]
                    kind[b, h, i, j] = 0 if not blk.any() else (2 if blk.all() else 1)
    return kind


def _block_pattern_mask(gen, shape, block, p_full=0.35, p_empty=0.35):
    """A mask with many empty / full blocks: per block pick empty, full or random elements."""
    *lead, sq, sk = shape
    bq, bk = block
    nq, nk = math.ceil(sq / bq), math.ceil(sk / bk)
    choice = torch.rand(*lead, nq, nk, generator=gen)
    expand = lambda t: t.repeat_interleave(bq, -2).repeat_interleave(bk, -1)[..., :sq, :sk]  # noqa: E731
    full = expand(choice < p_full)
    empty = expand(choice >= 1 - p_empty)
    noise = torch.rand(*lead, sq, sk, generator=gen) < 0.5
    return full | (noise & ~empty)


# ---------------------------------------------------------------------------------------------------
# The data structure
# ---------------------------------------------------------------------------------------------------

MASK_CASES = [
    # (mask shape, block_size)
    ((37, 50), (16, 16)),
    ((3, 64, 64), (16, 16)),  # S a multiple of the block
    ((2, 3, 113, 70), (32, 16)),
    ((1, 2, 5, 200), (8, 64)),
    ((2, 1, 1, 1), (16, 16)),
    ((2, 2, 17, 33), (1, 1)),
    ((40, 24), (64, 64)),  # one block bigger than the sequences
]


@pytest.mark.parametrize("shape,block", MASK_CASES, ids=lambda x: "x".join(map(str, x)))
def test_from_dense_kinds(shape, block):
    gen = _gen("kinds", shape, block)
    mask = _block_pattern_mask(gen, shape, block)
    bm = BlockMask.from_dense(mask, block)
    mask4 = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    want = _kind_by_loops(mask4, *block)
    assert bm.kind.dtype == torch.int8 and torch.equal(bm.kind, want)
    assert bm.shape == tuple(mask4.shape) and bm.block_size == tuple(block)
    assert (bm.seqlen_q, bm.seqlen_k) == shape[-2:]
    assert bm.num_blocks == tuple(want.shape[2:])
    assert torch.equal(bm.dense(), mask4)
    assert (bm.element_mask is None) == (not (want == 1).any())
    assert bm.density() == pytest.approx(float((want != 0).float().mean()))


def test_from_dense_plain_masks():
    # All visible: every block full, no element mask kept; all hidden: every block empty.
    ones = BlockMask.from_dense(torch.ones(50, 70, dtype=torch.bool), (16, 32))
    assert bool((ones.kind == BlockMask.FULL).all()) and ones.element_mask is None
    assert ones.density() == 1.0 and torch.equal(ones.dense(), torch.ones(1, 1, 50, 70, dtype=torch.bool))
    zeros = BlockMask.from_dense(torch.zeros(2, 50, 70, dtype=torch.bool), 16)
    assert bool((zeros.kind == BlockMask.EMPTY).all()) and zeros.element_mask is None
    assert zeros.density() == 0.0 and zeros.shape == (1, 2, 50, 70) and zeros.block_size == (16, 16)
    assert int(zeros.full_kv_num.sum()) == 0 and int(zeros.partial_kv_num.sum()) == 0
    # Edge blocks count only in-range elements: a mask True everywhere but in the last column.
    m = torch.ones(40, 40, dtype=torch.bool)
    m[:, 39] = False
    bm = BlockMask.from_dense(m, (16, 16))
    assert bm.kind[0, 0, :, :2].eq(2).all() and bm.kind[0, 0, :, 2].eq(1).all()


def test_broadcast_dims_stay_size_one():
    m = torch.rand(33, 45) < 0.5
    bm = BlockMask.from_dense(m.expand(3, 4, 33, 45), (16, 16))  # stride-0 view: never materialised
    assert bm.shape == (1, 1, 33, 45) and bm.kind.shape == (1, 1, 3, 3)
    assert torch.equal(bm.dense()[0, 0], m)
    bm3 = BlockMask.from_dense(torch.rand(1, 33, 45) < 0.5, 16)
    assert bm3.shape == (1, 1, 33, 45)
    bm4 = BlockMask.from_dense(torch.rand(2, 1, 33, 45) < 0.5, 16)
    assert bm4.shape == (2, 1, 33, 45) and bm4.full_kv_idx.shape == (2, 1, 3, 3)


def test_from_dense_non_contiguous():
    gen = _gen("nc")
    base = _block_pattern_mask(gen, (2, 3, 60, 90), (8, 8))
    m = base.transpose(2, 3)[:, :, ::2]  # [2, 3, 45, 60], odd strides
    bm = BlockMask.from_dense(m, (8, 8))
    assert torch.equal(bm.kind, _kind_by_loops(m, 8, 8)) and torch.equal(bm.dense(), m)
    assert bm.element_mask is None or bm.element_mask.is_contiguous()


def test_from_dense_classifies_in_slabs(monkeypatch):
    """The block classification works on query-block slabs when the mask is large."""
    import flashtile.masks as masks

    gen = _gen("slabs")
    m = _block_pattern_mask(gen, (2, 2, 77, 53), (8, 16))
    want = BlockMask.from_dense(m, (8, 16)).kind
    monkeypatch.setattr(masks, "_CLASSIFY_ELEMS", 1)
    assert torch.equal(BlockMask.from_dense(m, (8, 16)).kind, want)


def test_index_lists():
    gen = _gen("index")
    mask = _block_pattern_mask(gen, (2, 3, 150, 130), (16, 8))
    bm = BlockMask.from_dense(mask, (16, 8))
    nq, nk = bm.num_blocks
    lists = [
        ("full_kv", BlockMask.FULL, bm.kind, nk),
        ("partial_kv", BlockMask.PARTIAL, bm.kind, nk),
        ("full_q", BlockMask.FULL, bm.kind.transpose(2, 3), nq),
        ("partial_q", BlockMask.PARTIAL, bm.kind.transpose(2, 3), nq),
    ]
    for name, value, kind, n in lists:
        num, idx = getattr(bm, f"{name}_num"), getattr(bm, f"{name}_idx")
        assert num.dtype == torch.int32 and idx.dtype == torch.int32
        assert num.shape == kind.shape[:3] and idx.shape == kind.shape
        assert num.is_contiguous() and idx.is_contiguous()
        for b in range(2):
            for h in range(3):
                for r in range(kind.shape[2]):
                    want = torch.nonzero(kind[b, h, r] == value).flatten().tolist()
                    row = idx[b, h, r].tolist()
                    assert int(num[b, h, r]) == len(want), name
                    assert row[: len(want)] == want, name  # ascending, exactly the blocks of that kind
                    assert sorted(row) == list(range(n)), name  # every entry a valid block index
    assert int(bm.full_kv_num.sum()) == int((bm.kind == 2).sum()) == int(bm.full_q_num.sum())
    assert int(bm.partial_kv_num.sum()) == int((bm.kind == 1).sum()) == int(bm.partial_q_num.sum())



@pytest.mark.parametrize("by", ["query", "key"])
@pytest.mark.parametrize("mask_batch, heads_per_program", [(1, 1), (2, 1), (2, 3)])
def test_program_order_heaviest_first(by, mask_batch, heads_per_program):
    """The launch order is a permutation of the program ids whose work (full + 2 x partial blocks of
    the program's block, summed over its heads) never increases; equal work keeps the id order."""
    gen = _gen(f"order{by}{mask_batch}{heads_per_program}")
    batch, heads, sq, sk, block = 2, 3, 150, 130, (32, 16)
    mask = _block_pattern_mask(gen, (mask_batch, heads, sq, sk), block)
    bm = BlockMask.from_dense(mask, block)
    tile = block[0] // 2 if by == "query" else block[1] // 2  # two program tiles per block
    seqlen = sq if by == "query" else sk
    num_tiles = math.ceil(seqlen / tile)
    order = bm.program_order(by, batch, heads, heads_per_program, tile, num_tiles)
    programs = heads // heads_per_program
    assert order.dtype == torch.int32 and sorted(order.tolist()) == list(range(batch * programs * num_tiles))
    # the same work, counted element-block by block with Python loops
    kind = bm.kind.expand(batch, heads, -1, -1)
    if by == "key":
        kind = kind.transpose(2, 3)

    def work(pid):
        bp, t = divmod(pid, num_tiles)
        b, p = divmod(bp, programs)
        row = kind[b, p * heads_per_program:(p + 1) * heads_per_program, t * tile // (block[0] if by == "query" else block[1])]
        return int((row == BlockMask.FULL).sum()) + 2 * int((row == BlockMask.PARTIAL).sum())

    works = [work(pid) for pid in order.tolist()]
    assert works == sorted(works, reverse=True) and works[0] > works[-1]
    for (w0, p0), (w1, p1) in zip(zip(works, order.tolist()), zip(works[1:], order.tolist()[1:])):
        assert w0 > w1 or p0 < p1  # stable among equals
    assert bm.program_order(by, batch, heads, heads_per_program, tile, num_tiles) is order  # cached
    with pytest.raises(ValueError, match="by must be"):
        bm.program_order("rows", batch, heads, 1, tile, num_tiles)

def test_partial_tiles_hold_each_partial_block():
    """partial_tiles[partial_kv_tile / partial_q_tile of a listed partial block] is that block of the
    element mask (zero past the sequence ends): what the kernels read instead of the [Sq, Sk] mask."""
    gen = _gen("tiles")
    mask = _block_pattern_mask(gen, (2, 3, 150, 130), (16, 8))
    bm = BlockMask.from_dense(mask, (16, 8))
    bq, bk = bm.block_size
    padded = torch.zeros(2, 3, bm.num_blocks[0] * bq, bm.num_blocks[1] * bk, dtype=torch.bool)
    padded[:, :, :150, :130] = bm.element_mask
    assert bm.partial_tiles.dtype == torch.uint8 and bm.partial_tiles.shape[1:] == (bq, bk)
    for b in range(2):
        for h in range(3):
            for qb in range(bm.num_blocks[0]):
                for i in range(int(bm.partial_kv_num[b, h, qb])):
                    kb = int(bm.partial_kv_idx[b, h, qb, i])
                    tile = bm.partial_tiles[int(bm.partial_kv_tile[b, h, qb, i])].bool()
                    assert torch.equal(tile, padded[b, h, qb * bq:(qb + 1) * bq, kb * bk:(kb + 1) * bk])
            for kb in range(bm.num_blocks[1]):
                for i in range(int(bm.partial_q_num[b, h, kb])):
                    qb = int(bm.partial_q_idx[b, h, kb, i])
                    tile = bm.partial_tiles[int(bm.partial_q_tile[b, h, kb, i])].bool()
                    assert torch.equal(tile, padded[b, h, qb * bq:(qb + 1) * bq, kb * bk:(kb + 1) * bk])


def test_partial_intervals_stand_for_the_tiles():
    """partial_intervals (the kernels' cheaper form of interval rows) holds exactly each partial tile's
    rows where every row is one interval of keys, and is None as soon as one row is not; it survives
    the rule's refinement and the custom ops' flattening. Its key-major copy, through
    partial_q_interval, gives each key-block column's listed blocks consecutive entries."""
    ids = torch.tensor([0] * 37 + [1] * 50 + [2] * 41)
    doc = BlockMask.document(ids, block_size=(32, 16), causal=True)
    for m in (doc, doc.under_rule(None, 0), doc.under_rule(9, 0), BlockMask.from_parts(*doc.parts())):
        iv, P = m.partial_intervals, m.partial_tiles.shape[0]
        assert iv is not None and iv.dtype == torch.int64 and iv.shape == (2 * P, 32)
        where = (m.kind == BlockMask.PARTIAL).nonzero()
        keys = (where[:, 3, None, None] * 16 + torch.arange(16)[None, None, :])  # absolute keys of each tile
        lo, hi = (iv[:P] & 0xFFFFFFFF)[..., None], (iv[:P] >> 32)[..., None]
        assert torch.equal((keys >= lo) & (keys < hi), m.partial_tiles.bool())
        listed = torch.arange(m.partial_q_idx.shape[-1]) < m.partial_q_num.unsqueeze(-1)
        # the same block's entry in both copies: the column entry's intervals are its tile's
        assert torch.equal(iv[m.partial_q_interval[listed].long()], iv[m.partial_q_tile[listed].long()])
        _assert_listed_consecutive(m.partial_q_num, m.partial_q_interval)
    gaps = doc.element_mask.clone()
    gaps[0, 0, 60, 40] = False  # row 60 of its block now sees two intervals
    holes = BlockMask.from_dense(gaps, (32, 16))
    assert holes.partial_intervals is None and BlockMask.from_parts(*holes.parts()).partial_intervals is None
    assert holes.partial_q_interval is None
    assert BlockMask.from_blocks(torch.ones(1, 1, 2, 2, dtype=torch.bool), (16, 16)).partial_intervals is None


def _assert_listed_consecutive(num: torch.Tensor, entries: torch.Tensor) -> None:
    """entries[..., j] == entries[..., 0] + j for the first num[...] (listed) entries of each list."""
    listed = torch.arange(entries.shape[-1]) < num.unsqueeze(-1)
    step = torch.arange(entries.shape[-1], dtype=torch.int32)
    assert torch.equal(torch.where(listed, entries, 0), torch.where(listed, entries[..., :1] + step, 0))


def test_partial_tiles_of_a_query_row_are_consecutive():
    """The forward and dQ kernels address a query-block row's element-mask tiles as its first listed
    tile + list position (kernels/common.py: row_tile_ptrs), never loading the others' numbers: that
    must hold for every way a mask is built, refined by a rule, or flattened for the custom ops."""
    gen = _gen("consecutive")
    mask = _block_pattern_mask(gen, (2, 3, 150, 130), (16, 8)) & (torch.rand(2, 3, 150, 130, generator=gen) < 0.8)
    bm = BlockMask.from_dense(mask, (16, 8))
    assert int(bm.partial_kv_num.max()) > 2  # rows with several partial blocks, so a wrong step shows
    ids = torch.tensor([0] * 100 + [1] * 156 + [2] * 256)
    doc = BlockMask.document(ids, block_size=(64, 64), causal=True)
    for m in (bm, bm.under_rule(5, 0), doc, doc.under_rule(None, 0), BlockMask.from_parts(*doc.parts())):
        _assert_listed_consecutive(m.partial_kv_num, m.partial_kv_tile)


def _effective(bm: BlockMask) -> torch.Tensor:
    """The element mask the kernels apply: FULL blocks all visible, EMPTY none, PARTIAL the stored one."""
    bq, bk = bm.block_size
    kind = bm.kind.repeat_interleave(bq, 2).repeat_interleave(bk, 3)[:, :, :bm.seqlen_q, :bm.seqlen_k]
    return torch.where(kind == BlockMask.FULL, True, (kind == BlockMask.PARTIAL) & bm.element_mask)


@pytest.mark.parametrize("edges", [(None, 0), (5, 0), (7, 3), (4, None)], ids=str)
def test_under_rule_changes_no_visible_element(edges):
    """Under a causal / window rule, partial blocks that the rule explains become FULL or EMPTY, and
    the mask ANDed with the rule is unchanged (so attention is). A document mask built with causal=True
    keeps only its document-boundary blocks partial under the causal rule."""
    left, right = edges
    gen = _gen(f"rule{edges}")
    sq, sk = 90, 77
    rule = visibility_mask(sq, sk, False, (left if left is not None else -1, right if right is not None else -1))
    mask = _block_pattern_mask(gen, (2, 1, sq, sk), (16, 8)) & ((torch.rand(2, 1, sq, sk, generator=gen) < 0.9) | rule)
    bm = BlockMask.from_dense(mask, (16, 8))
    refined = bm.under_rule(left, right)
    assert refined is bm.under_rule(left, right)  # cached
    assert torch.equal(_effective(refined) & rule, bm.element_mask & rule)
    assert int((refined.kind == BlockMask.PARTIAL).sum()) <= int((bm.kind == BlockMask.PARTIAL).sum())
    assert bm.under_rule(None, None) is bm


def test_under_rule_document_causal():
    ids = torch.tensor([0] * 100 + [1] * 156 + [2] * 256)
    bm = BlockMask.document(ids, block_size=(64, 64), causal=True)
    refined = bm.under_rule(None, 0)
    starts = (100, 256)  # under the causal rule, only blocks that a document start cuts stay partial
    for qb in range(8):
        for kb in range(qb + 1):
            if int(bm.kind[0, 0, qb, kb]) == BlockMask.EMPTY:
                continue
            cut = any(qb * 64 < s < (qb + 1) * 64 or kb * 64 < s < (kb + 1) * 64 for s in starts)
            want = BlockMask.PARTIAL if cut else BlockMask.FULL
            assert int(refined.kind[0, 0, qb, kb]) == want, (qb, kb)
    assert int((refined.kind == BlockMask.PARTIAL).sum()) < int((bm.kind == BlockMask.PARTIAL).sum())
    rule = visibility_mask(512, 512, True)
    assert torch.equal(_effective(refined)[0, 0] & rule, bm.element_mask[0, 0] & rule)


def test_from_blocks():
    gen = _gen("blocks")
    blocks = torch.rand(2, 1, 4, 5, generator=gen) < 0.5
    bm = BlockMask.from_blocks(blocks, (16, 8), seqlen_q=50, seqlen_k=37)
    assert bm.shape == (2, 1, 50, 37) and bm.element_mask is None
    assert torch.equal(bm.kind, torch.where(blocks, 2, 0).to(torch.int8))
    want = blocks.repeat_interleave(16, 2).repeat_interleave(8, 3)[:, :, :50, :37]
    assert torch.equal(bm.dense(), want)
    assert bm.density() == pytest.approx(float(blocks.float().mean()))
    assert torch.equal(bm.full_kv_num, blocks.sum(-1).to(torch.int32))
    # seqlen defaults to whole blocks; 2-D and 3-D blocks get size-1 leading dims
    bm2 = BlockMask.from_blocks(blocks[0, 0], 16)
    assert bm2.shape == (1, 1, 64, 80) and bm2.block_size == (16, 16)
    assert BlockMask.from_blocks(blocks[:, 0], (16, 8), 64, 40).shape == (1, 2, 64, 40)
    with pytest.raises(ValueError, match="seqlen_q=70"):
        BlockMask.from_blocks(blocks, (16, 8), seqlen_q=70, seqlen_k=37)
    with pytest.raises(ValueError, match="seqlen_k=32"):
        BlockMask.from_blocks(blocks, (16, 8), seqlen_q=64, seqlen_k=32)
    with pytest.raises(TypeError, match="bool"):
        BlockMask.from_blocks(blocks.int(), (16, 8))


@pytest.mark.parametrize("sq,sk", [(77, 77), (50, 113), (113, 50), (1, 40), (0, 5)])
@pytest.mark.parametrize("block", [(16, 16), (32, 16)], ids=["16x16", "32x16"])
def test_causal_and_window_builders(sq, sk, block):
    bm = BlockMask.causal(sq, sk, block)
    assert torch.equal(bm.dense()[0, 0], visibility_mask(sq, sk, True))
    assert torch.equal(bm.kind, _kind_by_loops(visibility_mask(sq, sk, True)[None, None], *block))
    for window in [(10, 0), (5, 20), (-1, 3), (30, -1), (-1, -1), (0, 0)]:
        bw = BlockMask.sliding_window(sq, sk, window, block)
        want = visibility_mask(sq, sk, False, window)
        assert torch.equal(bw.dense()[0, 0], want), window
        assert torch.equal(bw.kind, _kind_by_loops(want[None, None], *block)), window
    assert BlockMask.sliding_window(sq, sk, (-1, -1), block).element_mask is None


def test_document_builder():
    ids = torch.tensor([0] * 20 + [1] * 35 + [2] * 3 + [5] * 42)  # 100 tokens, 4 documents
    bm = BlockMask.document(ids, block_size=(16, 16))
    want = ids[:, None] == ids[None, :]
    assert bm.shape == (1, 1, 100, 100) and torch.equal(bm.dense()[0, 0], want)
    assert torch.equal(bm.kind, _kind_by_loops(want[None, None], 16, 16))
    causal = BlockMask.document(ids, block_size=(16, 16), causal=True)
    assert torch.equal(causal.dense()[0, 0], want & torch.ones(100, 100, dtype=torch.bool).tril())
    # batched ids, and cross attention with other key ids (bottom-right causal)
    gen = _gen("docs")
    ids_b = torch.randint(0, 3, (2, 60), generator=gen).sort(dim=1).values
    ids_k = torch.randint(0, 3, (1, 90), generator=gen).sort(dim=1).values
    bb = BlockMask.document(ids_b, ids_k, block_size=(16, 32), causal=True)
    want_b = (ids_b[:, :, None] == ids_k[:, None, :]) & visibility_mask(60, 90, True)
    assert bb.shape == (2, 1, 60, 90) and torch.equal(bb.dense()[:, 0], want_b)
    with pytest.raises(ValueError, match="batch"):
        BlockMask.document(torch.zeros(2, 10, dtype=torch.long), torch.zeros(3, 10, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        BlockMask.document(torch.zeros(10))
    with pytest.raises(ValueError, match=r"\[seqlen\] or \[batch, seqlen\]"):
        BlockMask.document(torch.zeros(1, 2, 10, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        BlockMask.document([0, 0, 1])


def test_validation_errors():
    m = torch.ones(20, 20, dtype=torch.bool)
    with pytest.raises(TypeError, match="bool"):
        BlockMask.from_dense(m.float())
    with pytest.raises(TypeError, match="torch.Tensor"):
        BlockMask.from_dense([[True]])
    for shape in [(20,), (1, 1, 1, 20, 20)]:
        with pytest.raises(ValueError, match="2, 3 or 4 dims"):
            BlockMask.from_dense(torch.ones(shape, dtype=torch.bool))
    for bad in [0, -16, (16,), (16, 0), (16, 2.0), "16", True, (16, 16, 16), None]:
        with pytest.raises(ValueError, match="block_size"):
            BlockMask.from_dense(m, bad)
    with pytest.raises(ValueError, match="window_size"):
        BlockMask.sliding_window(10, 10, (-2, 0), 16)
    with pytest.raises(ValueError, match="seqlen_q"):
        BlockMask.causal(-1, 10, 16)
    # The raw constructor checks kind against the element mask and the sizes.
    kind = torch.full((1, 1, 2, 2), 2, dtype=torch.int8)
    with pytest.raises(ValueError, match="needs"):
        BlockMask((16, 16), 40, 20, kind)
    with pytest.raises(ValueError, match="element_mask is required"):
        BlockMask((16, 16), 20, 20, torch.ones(1, 1, 2, 2, dtype=torch.int8))
    with pytest.raises(ValueError, match="disagrees"):
        BlockMask((16, 16), 20, 20, kind, ~torch.eye(20, dtype=torch.bool)[None, None])
    with pytest.raises(ValueError, match="0 \\(empty\\)"):
        BlockMask((16, 16), 20, 20, kind + 1)
    with pytest.raises(TypeError, match="int8"):
        BlockMask((16, 16), 20, 20, kind.long())
    # A block marked partial that is in fact full is allowed (slower, not wrong).
    eye = BlockMask((16, 16), 20, 20, torch.ones(1, 1, 2, 2, dtype=torch.int8), m[None, None])
    assert torch.equal(eye.dense()[0, 0], m)


def test_frozen_to_and_repr():
    bm = BlockMask.causal(50, 70, (16, 16))
    with pytest.raises(dataclasses.FrozenInstanceError):
        bm.kind = bm.kind  # type: ignore[misc]
    assert bm.to("cpu") is bm and bm.device == torch.device("cpu")
    r = repr(bm)
    assert r.startswith("BlockMask(shape=[1, 1, 50, 70], block_size=(16, 16)") and "density=" in r
    if torch.cuda.is_available():
        g = bm.to("cuda")
        assert g.kind.is_cuda and g.element_mask.is_cuda and g.full_kv_idx.is_cuda and g.partial_kv_num.is_cuda
        assert torch.equal(g.dense().cpu(), bm.dense()) and torch.equal(g.full_kv_idx.cpu(), bm.full_kv_idx)


# ---------------------------------------------------------------------------------------------------
# The CPU path against the oracle
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(params=["default_tiles", "small_tiles"])
def tiles(request, monkeypatch):
    """Shipped tiles (one tile covers S <= 200), and small ones with one batch element per chunk."""
    if request.param == "small_tiles":
        monkeypatch.setattr(cpu, "BLOCK_M", 24)  # rounds to whole mask blocks
        monkeypatch.setattr(cpu, "BLOCK_N", 40)
        monkeypatch.setattr(cpu, "_TILE_ELEMS", 1)  # batch chunk 1
    return request.param


def _make(gen, shape, dtype, scale_q=1.0):
    batch, s_q, s_k, h_q, h_kv, d = shape
    q = (torch.randn(batch, s_q, h_q, d, generator=gen) * scale_q).to(dtype)
    k = torch.randn(batch, s_k, h_kv, d, generator=gen).to(dtype)
    v = torch.randn(batch, s_k, h_kv, d, generator=gen).to(dtype)
    dout = torch.randn(batch, s_q, h_q, d, generator=gen).to(dtype)
    return q, k, v, dout


def _check(q, k, v, dout, bm, *, causal=False, window=(-1, -1), softcap=0.0, alibi=None, scale=None):
    """CPU path forward + backward with ``block_mask=bm`` vs the oracle; returns (out, lse, dq, dk, dv)."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out, lse = cpu.attention_forward(q, k, v, scale, causal, window, softcap, alibi, block_mask=bm)
    dq, dk, dv = cpu.attention_backward(dout, q, k, v, out, lse, scale, causal, window, softcap, alibi,
                                        block_mask=bm)
    assert_results_match_oracle(q, k, v, dout, (out, lse), (dq, dk, dv), softmax_scale=scale, causal=causal,
                                window_size=window, softcap=softcap, alibi_slopes=alibi, block_mask=bm)
    return out, lse, dq, dk, dv


def _mask_for(kind, gen, shape, block):
    """A BlockMask of the given kind for attention of ``shape`` (B, Sq, Sk, Hq, Hkv, D)."""
    batch, sq, sk, hq = shape[:4]
    if kind == "dense_bh":
        return BlockMask.from_dense(_block_pattern_mask(gen, (batch, hq, sq, sk), block), block)
    if kind == "dense_2d":
        return BlockMask.from_dense(_block_pattern_mask(gen, (sq, sk), block), block)
    if kind == "dense_h":
        return BlockMask.from_dense(_block_pattern_mask(gen, (1, hq, sq, sk), block), block)
    if kind == "dense_b":
        return BlockMask.from_dense(_block_pattern_mask(gen, (batch, 1, sq, sk), block), block)
    if kind == "blocks":
        nq, nk = math.ceil(sq / block[0]), math.ceil(sk / block[1])
        return BlockMask.from_blocks(torch.rand(batch, hq, nq, nk, generator=gen) < 0.5, block, sq, sk)
    if kind == "causal":
        return BlockMask.causal(sq, sk, block)
    if kind == "window":
        return BlockMask.sliding_window(sq, sk, (25, 10), block)
    if kind == "document":
        ids = torch.randint(0, 4, (batch, sq), generator=gen).sort(dim=1).values
        ids_k = ids if sk == sq else torch.randint(0, 4, (batch, sk), generator=gen).sort(dim=1).values
        return BlockMask.document(ids, ids_k, block_size=block, causal=True)
    raise AssertionError(kind)


# batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim
SHAPES = [
    (2, 113, 113, 4, 2, 32),  # GQA
    (1, 77, 150, 3, 1, 40),  # MQA, Sq < Sk
    (2, 150, 61, 2, 2, 24),  # Sq > Sk
]
KINDS = ["dense_bh", "dense_2d", "dense_h", "dense_b", "blocks", "causal", "window", "document"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_cpu_matches_oracle(tiles, kind, shape, dtype):
    gen = _gen(kind, shape, dtype, tiles)
    block = (16, 16) if shape[1] % 2 else (32, 16)
    bm = _mask_for(kind, gen, shape, block)
    q, k, v, dout = _make(gen, shape, dtype)
    _check(q, k, v, dout, bm)


FEATURES = {
    "causal": dict(causal=True),
    "window": dict(window=(30, 5)),
    "causal_window": dict(causal=True, window=(40, -1)),
    "softcap": dict(softcap=2.0),
    "alibi": dict(alibi="batch_heads", causal=True),
    "all": dict(causal=True, window=(50, -1), softcap=3.0, alibi="heads", scale=0.3),
}


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_cpu_composes_with_features(tiles, feature, dtype):
    opts = dict(FEATURES[feature])
    shape = (2, 101, 133, 4, 2, 32)
    gen = _gen(feature, dtype, tiles)
    bm = _mask_for("dense_bh", gen, shape, (16, 16))
    q, k, v, dout = _make(gen, shape, dtype, scale_q=3.0 if "softcap" in opts else 1.0)
    alibi = opts.pop("alibi", None)
    if alibi is not None:
        rows = (shape[0],) if alibi == "batch_heads" else ()
        opts["alibi"] = torch.rand(*rows, shape[3], generator=gen) * 0.5 + 0.01
    _check(q, k, v, dout, bm, **opts)


def test_cpu_bf16_small():
    gen = _gen("bf16")
    shape = (1, 45, 70, 2, 1, 32)
    q, k, v, dout = _make(gen, shape, torch.bfloat16)
    _check(q, k, v, dout, _mask_for("dense_bh", gen, shape, (16, 16)), causal=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_fully_masked_rows(tiles, dtype):
    gen = _gen("dead", dtype, tiles)
    shape = (2, 100, 90, 4, 2, 32)
    mask = _block_pattern_mask(gen, (2, 4, 100, 90), (16, 16))
    mask[:, :, 20:45] = False  # rows 20..44 see nothing: spans block edges
    mask[1, 2] = False  # one whole (batch, head)
    mask[:, :, 70:75, 30:] = False
    mask[:, :, 70:75, :30] = False
    bm = BlockMask.from_dense(mask, (16, 16))
    q, k, v, dout = _make(gen, shape, dtype)
    out, lse, dq, dk, dv = _check(q, k, v, dout, bm)
    dead = ~mask.any(dim=-1)  # [B, Hq, Sq]
    assert bool(dead[:, :, 20:45].all()) and bool(dead[1, 2].all())
    assert torch.all(lse[dead] == NEG_INF) and torch.isfinite(lse[~dead]).all()
    out_bhs = out.transpose(1, 2)
    dq_bhs = dq.transpose(1, 2)
    assert torch.all(out_bhs[dead] == 0) and torch.all(dq_bhs[dead] == 0)
    assert all(torch.isfinite(t).all() for t in (out, dq, dk, dv))
    # With the causal rule too (Sq > Sk leaves the first rows dead anyway).
    _check(q, k, v, dout, bm, causal=True)


def test_empty_blocks_are_skipped(tiles):
    """Keys in blocks empty for every (b, h) are never read: NaN there changes nothing."""
    gen = _gen("skip", tiles)
    shape = (2, 96, 112, 2, 1, 16)
    blocks = torch.rand(2, 2, 6, 7, generator=gen) < 0.5
    blocks[:, :, :, 3] = False  # key block 3 (keys 48..63) empty everywhere
    bm = BlockMask.from_blocks(blocks, (16, 16), 96, 112)
    q, k, v, dout = _make(gen, shape, torch.float32)
    out, lse = cpu.attention_forward(q, k, v, 0.25, block_mask=bm)
    grads = cpu.attention_backward(dout, q, k, v, out, lse, 0.25, block_mask=bm)
    k2, v2 = k.clone(), v.clone()
    k2[:, 48:64] = float("nan")
    v2[:, 48:64] = float("nan")
    out2, lse2 = cpu.attention_forward(q, k2, v2, 0.25, block_mask=bm)
    grads2 = cpu.attention_backward(dout, q, k2, v2, out2, lse2, 0.25, block_mask=bm)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)
    assert torch.equal(grads[0], grads2[0])
    assert all(torch.equal(g[:, 48:64], torch.zeros_like(g[:, 48:64])) for g in grads2[1:])
    _check(q, k, v, dout, bm)


def test_all_full_mask_equals_no_mask(tiles):
    gen = _gen("full", tiles)
    q, k, v, dout = _make(gen, (2, 70, 90, 2, 2, 16), torch.float32)
    bm = BlockMask.from_dense(torch.ones(70, 90, dtype=torch.bool), (32, 16))
    for causal in (False, True):
        out, lse = cpu.attention_forward(q, k, v, 0.3, causal, block_mask=bm)
        ref_out, ref_lse = cpu.attention_forward(q, k, v, 0.3, causal)
        assert torch.allclose(out, ref_out, atol=1e-6) and torch.allclose(lse, ref_lse, atol=1e-6)


def test_deterministic():
    gen = _gen("det")
    shape = (2, 113, 113, 4, 2, 32)
    bm = _mask_for("document", gen, shape, (16, 16))
    q, k, v, dout = _make(gen, shape, torch.float16)
    runs = []
    for _ in range(2):
        out, lse = cpu.attention_forward(q, k, v, 0.2, block_mask=bm)
        runs.append((out, lse, *cpu.attention_backward(dout, q, k, v, out, lse, 0.2, block_mask=bm)))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_empty_inputs():
    q = torch.randn(2, 0, 2, 8)
    k = v = torch.randn(2, 5, 1, 8)
    bm = BlockMask.from_dense(torch.ones(0, 5, dtype=torch.bool), 16)
    out, lse = cpu.attention_forward(q, k, v, 0.3, block_mask=bm)
    assert out.shape == (2, 0, 2, 8) and lse.shape == (2, 2, 0)
    dq, dk, dv = cpu.attention_backward(out, q, k, v, out, lse, 0.3, block_mask=bm)
    assert torch.all(dk == 0) and torch.all(dv == 0)


def test_incompatible_mask_errors():
    q, k, v, dout = _make(_gen("bad"), (2, 40, 50, 4, 2, 8), torch.float32)
    cases = [
        (BlockMask.causal(41, 50, 16), "seqlen"),
        (BlockMask.from_dense(torch.ones(3, 1, 40, 50, dtype=torch.bool), 16), "batch 3"),
        (BlockMask.from_dense(torch.ones(2, 40, 50, dtype=torch.bool), 16), "2 heads"),
    ]
    for bm, match in cases:
        with pytest.raises(ValueError, match=match):
            cpu.attention_forward(q, k, v, 0.3, block_mask=bm)
        with pytest.raises(ValueError, match=match):
            cpu.attention_backward(dout, q, k, v, dout, torch.zeros(2, 4, 40), 0.3, block_mask=bm)
        with pytest.raises(ValueError, match=match):
            attention_ref(q, k, v, block_mask=bm)
    dense = torch.ones(40, 50, dtype=torch.bool)
    with pytest.raises(TypeError, match="BlockMask"):
        cpu.attention_forward(q, k, v, 0.3, block_mask=dense)
    with pytest.raises(TypeError, match="BlockMask"):
        attention_ref(q, k, v, block_mask=dense)
