"""Every kernel specialisation we ship compiles for Hopper (sm_90), even on a machine with no GPU.

Triton's interpreter accepts code that the GPU compiler rejects (a non-constexpr global, a type that
changes between branches), so the CPU test run alone could ship kernels that fail on every GPU. This
compiles the real PTX/cubin with the ptxas bundled in the triton wheel; no driver is needed. It runs
in a subprocess because conftest.py turns the interpreter on for this process when there is no GPU.
"""

import os
import re
import subprocess
import sys

if __name__ == "__main__" or os.environ.get("FLASHTILE_COMPILE_CHECK") == "1":
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from flashtile.kernels.attention_bwd import attention_bwd_dkdv_kernel, attention_bwd_dq_kernel
    from flashtile.kernels.attention_fwd import attention_fwd_kernel
    from flashtile.kernels.gemm import gemm_kernel
    from flashtile.offline_compile import compile_for_sm90 as _compile

FLAG_SETS = [
    dict(HAS_LEFT=False, HAS_RIGHT=False, SOFTCAP=False, HAS_ALIBI=False, VARLEN=False, BLOCK_SPARSE=False,
         ATTN_MASK=0, DROPOUT=False, EVEN_D=True, EVEN_DV=True, BIAS_GRAD=False, TILE_MAJOR=False,
         HEAD_GROUP=0, SPLIT_PHASES=False, SEQLEN_Q=0, SEQLEN_K=0),
    dict(HAS_LEFT=True, HAS_RIGHT=True, SOFTCAP=True, HAS_ALIBI=True, VARLEN=True, BLOCK_SPARSE=False,
         ATTN_MASK=2, DROPOUT=True, EVEN_D=False, EVEN_DV=False, BIAS_GRAD=True, TILE_MAJOR=True,
         HEAD_GROUP=4, SPLIT_PHASES=True, SEQLEN_Q=0, SEQLEN_K=0),
    dict(HAS_LEFT=False, HAS_RIGHT=True, SOFTCAP=2, HAS_ALIBI=False, VARLEN=False, BLOCK_SPARSE=2,
         ATTN_MASK=0, DROPOUT=2, EVEN_D=True, EVEN_DV=True, BIAS_GRAD=False, TILE_MAJOR=False,
         HEAD_GROUP=0, SPLIT_PHASES=False, SEQLEN_Q=513, SEQLEN_K=1024),
    # block masks whose partial rows are key intervals: the merged full + partial walk (forward, dQ)
    dict(HAS_LEFT=True, HAS_RIGHT=True, SOFTCAP=False, HAS_ALIBI=1, VARLEN=False, BLOCK_SPARSE=3,
         ATTN_MASK=0, DROPOUT=True, EVEN_D=False, EVEN_DV=True, BIAS_GRAD=False, TILE_MAJOR=False,
         HEAD_GROUP=0, SPLIT_PHASES=False, SEQLEN_Q=0, SEQLEN_K=0),
    # head dims in two chunks (tuning.head_dim_chunks): 64 + 16 columns with a padded tail on Q/K,
    # 64 + 32 whole on V, with every per-score feature and block masks; ALiBi as |key term - query term|
    # (kernels/common.py's ALIBI_TERM_DISTANCE)
    dict(HAS_LEFT=True, HAS_RIGHT=True, SOFTCAP=2, HAS_ALIBI=4, VARLEN=False, BLOCK_SPARSE=True,
         ATTN_MASK=1, DROPOUT=True, EVEN_D=True, EVEN_DV=True, BIAS_GRAD=False, TILE_MAJOR=False,
         HEAD_GROUP=0, SPLIT_PHASES=False, SEQLEN_Q=0, SEQLEN_K=0,
         BLOCK_D2=16, BLOCK_DV2=32, EVEN_D2=False, EVEN_DV2=True),
]


def compile_all() -> None:
    for elem, precision in (("bf16", "ieee"), ("fp32", "tf32")):
        for flags in FLAG_SETS:
            common = dict(flags, DOT_PRECISION=precision, BLOCK_D=64, BLOCK_DV=64,
                          BLOCK_SQ=128 if flags["BLOCK_SPARSE"] else 0, BLOCK_SK=128 if flags["BLOCK_SPARSE"] else 0)
            fwd = _compile(attention_fwd_kernel, elem, dict(common, BLOCK_M=128, BLOCK_N=64))
            dq = _compile(attention_bwd_dq_kernel, elem, dict(common, BLOCK_M=64, BLOCK_N=32))
            dkdv = _compile(attention_bwd_dkdv_kernel, elem, dict(common, BLOCK_M=32, BLOCK_N=64))
            for k in (fwd, dq, dkdv):
                assert "ptx" in k.asm and k.metadata.shared > 0
    compile_forward_configs()
    compile_gemm_variants()
    compile_wide_variants()
    print("compiled")


def compile_forward_configs() -> None:
    """tuning.forward_config's Hopper tiles for D=128 bf16 fit shared memory on the flag sets they run
    with: 128-key tiles only for long keys without per-score extras (plain_keys) or with only a bool
    attn_mask (long_bool_mask), two programs an SM on short walks, else 128 x 64."""
    import torch

    from flashtile.tuning import backward_config, forward_config

    gpu = torch.device("cuda", 0)
    torch.cuda.get_device_capability = lambda *a, **k: (9, 0)  # no driver here: the H200's tables
    long_cfg = forward_config(gpu, 128, 128, torch.bfloat16, True, plain_keys=4096)
    assert (long_cfg.block_m, long_cfg.block_n) == (128, 128), long_cfg
    for args in ((128, 128, 0), (64, 64, 4096)):  # not plain; D = 64
        cfg = forward_config(gpu, args[0], args[1], torch.bfloat16, True, plain_keys=args[2])
        assert (cfg.block_m, cfg.block_n) == (128, 64), (args, cfg)
    mask_cfg = forward_config(gpu, 128, 128, torch.bfloat16, False, long_bool_mask=True)
    assert (mask_cfg.block_m, mask_cfg.block_n) == (128, 128), mask_cfg
    # a softcap that bounds the scores (MAX_MODE = MAX_FIXED): 128 x 32 from D = 65 to 128, D = 64 keeps 128 x 64
    capped_cfg = forward_config(gpu, 96, 96, torch.bfloat16, False, fixed_max=True)
    assert (capped_cfg.block_m, capped_cfg.block_n, capped_cfg.num_stages) == (128, 32, 3), capped_cfg
    d64 = forward_config(gpu, 64, 64, torch.bfloat16, False, fixed_max=True)
    assert (d64.block_m, d64.block_n) == (128, 64), d64
    from flashtile.attention_launch import max_mode
    plain = dict(FLAG_SETS[0], DOT_PRECISION="ieee", BLOCK_D=128, BLOCK_DV=128, BLOCK_SQ=0, BLOCK_SK=0)
    raw_max = dict(plain, MAX_MODE=max_mode(0.0, torch.bfloat16, False, 0, 128, False, 0.088))  # MAX_RAW
    # short walks (tuning._short_forward): two programs an SM
    short_causal = forward_config(gpu, 128, 128, torch.bfloat16, True, plain_keys=1024)
    short_plain = forward_config(gpu, 128, 128, torch.bfloat16, False, plain_keys=1024)
    assert (short_causal.block_m, short_causal.num_warps, short_plain.block_n) == (64, 4, 32), (short_causal, short_plain)
    for flags, c in ((dict(raw_max, HAS_RIGHT=True, TILE_MAJOR=True, HEAD_GROUP=4), short_causal),
                     (dict(plain, HAS_RIGHT=True, HAS_ALIBI=3), short_causal), (raw_max, short_plain)):
        k = _compile(attention_fwd_kernel, "bf16", dict(flags, BLOCK_M=c.block_m, BLOCK_N=c.block_n),
                     num_warps=c.num_warps, num_stages=c.num_stages)
        # two programs an SM: the H200's 228 KiB of shared memory, less 1 KiB the hardware keeps per block
        assert k.metadata.shared <= 228 * 1024 // 2 - 1024, k.metadata.shared
    for flags, c in ((plain, long_cfg), (raw_max, long_cfg), (dict(raw_max, HAS_RIGHT=True, DROPOUT=2), long_cfg),
                     (dict(plain, HAS_RIGHT=True, HAS_ALIBI=True, TILE_MAJOR=True, HEAD_GROUP=4), long_cfg),
                     (dict(plain, ATTN_MASK=1), mask_cfg),
                     (dict(plain, SOFTCAP=2, MAX_MODE=1, HAS_RIGHT=True, DROPOUT=2, ATTN_MASK=1), capped_cfg)):
        k = _compile(attention_fwd_kernel, "bf16", dict(flags, BLOCK_M=c.block_m, BLOCK_N=c.block_n),
                     num_warps=c.num_warps, num_stages=c.num_stages)
        assert k.metadata.shared <= 232448, k.metadata.shared  # H100/H200: 227 KiB per block
    # head dims 257..384 on the dense forward (dispatch.wide_forward_heads): 256 + 64 columns on 3
    # stages, 256 + 128 on 2 with the lazy rescale (attention_launch.max_mode)
    from flashtile.tuning import head_dim_chunks
    for d, stages in ((320, 3), (384, 2)):
        c = forward_config(gpu, d, d, torch.bfloat16, False)
        assert (c.block_m, c.block_n, c.num_stages) == (128, 32, stages), (d, c)
        first, tail = head_dim_chunks(d)
        k = _compile(attention_fwd_kernel, "bf16",
                     dict(plain, BLOCK_D=first, BLOCK_D2=tail, BLOCK_DV=first, BLOCK_DV2=tail,
                          MAX_MODE=max_mode(0.0, torch.bfloat16, False, 0, d), BLOCK_M=c.block_m, BLOCK_N=c.block_n),
                     num_warps=c.num_warps, num_stages=c.num_stages)
        assert k.metadata.shared <= 232448, (d, k.metadata.shared)
    # the long causal backward: split-phase dK/dV, heads in tile-major groups
    bwd = backward_config(gpu, 128, 128, torch.bfloat16, True, long_causal=True)
    assert bwd.split_phases, bwd
    causal = dict(plain, HAS_RIGHT=True, TILE_MAJOR=True, HEAD_GROUP=4, SPLIT_PHASES=True)
    for kernel, c in ((attention_bwd_dkdv_kernel, bwd.dkdv), (attention_bwd_dq_kernel, bwd.dq)):
        k = _compile(kernel, "bf16", dict(causal, BLOCK_M=c.block_m, BLOCK_N=c.block_n),
                     num_warps=c.num_warps, num_stages=c.num_stages)
        assert k.metadata.shared <= 232448, k.metadata.shared
    # with the lengths as constants (GQA's split-phase walk takes them) that are multiples of 16, the
    # dK/dV kernel loads lse / delta as aligned rows (ALIGN_LSE, which tuning asks for there)
    assert bwd.aligned_rows, bwd
    k = _compile(attention_bwd_dkdv_kernel, "bf16", dict(causal, SEQLEN_Q=8192, SEQLEN_K=8192, ALIGN_LSE=True, BLOCK_M=bwd.dkdv.block_m,
                                                          BLOCK_N=bwd.dkdv.block_n),
                 num_warps=bwd.dkdv.num_warps, num_stages=bwd.dkdv.num_stages)
    copies = set(re.findall(r"cp\.async\.\w+\.shared\.global \[[^]]*\], \[[^]]*\], (0x\w+)", k.asm["ptx"]))
    assert "0x8" in copies and "0x4" not in copies, copies  # lse / delta in 8-byte copies, not 4
    # the short-walk dK/dV tiles (short causal, narrow windows), with a window and ALiBi
    short = backward_config(gpu, 128, 128, torch.bfloat16, True, short_walk=True).dkdv
    k = _compile(attention_bwd_dkdv_kernel, "bf16",
                 dict(plain, HAS_LEFT=True, HAS_RIGHT=True, HAS_ALIBI=True, BLOCK_M=short.block_m, BLOCK_N=short.block_n),
                 num_warps=short.num_warps, num_stages=short.num_stages)
    assert k.metadata.shared <= 232448, k.metadata.shared


def compile_wide_variants() -> None:
    """The wide-head kernels (kernels/attention_wide.py) with the shipped configs (tuning.wide_*_config)."""
    import torch

    from flashtile.kernels.attention_wide import wide_delta_kernel, wide_dkdv_kernel, wide_dq_kernel, wide_fwd_kernel
    from flashtile.tuning import wide_backward_config, wide_forward_config
    from flashtile.wide_launch import DELTA_BLOCK, wide_parts

    gpu = torch.device("cuda", 0)
    torch.cuda.get_device_capability = lambda *a, **k: (9, 0)  # no driver here: the H200's tables
    plain = dict(HAS_LEFT=False, HAS_RIGHT=False, SOFTCAP=False, HAS_ALIBI=False, VARLEN=False, EVEN_K=True,
                 EVEN_KV=True, ATTN_MASK=0, DROPOUT=False)
    every = dict(HAS_LEFT=True, HAS_RIGHT=True, SOFTCAP=True, HAS_ALIBI=True, VARLEN=True, EVEN_K=False,
                 EVEN_KV=False, ATTN_MASK=2, DROPOUT=True)
    # D=640: 320-wide slices everywhere; D=768: 384-wide backward slices (dQ on 64 rows, dK / dV on 128)
    for elem, dtype, precision, flag_sets, dim in (("bf16", torch.bfloat16, "ieee", (plain, every), 640),
                                                   ("bf16", torch.bfloat16, "ieee", (plain,), 768),
                                                   ("fp32", torch.float32, "tf32", (every,), 640)):
        fwd_cfg = wide_forward_config(gpu, dim, dim, dtype, False)
        bwd_cfg = wide_backward_config(gpu, dim, dim, dtype, False)
        for flags in flag_sets:
            common = dict(flags, DOT_PRECISION=precision)
            jobs = [(wide_fwd_kernel, fwd_cfg, {}),
                    (wide_dq_kernel, bwd_cfg.dq, dict(BIAS_GRAD=flags["ATTN_MASK"] == 2)),
                    (wide_dkdv_kernel, bwd_cfg.dk, dict(DKDV=1)), (wide_dkdv_kernel, bwd_cfg.dv, dict(DKDV=0))]
            for kernel, c, extra in jobs:
                part_a, part_b, _ = wide_parts(dim, c.max_part)
                consts = dict(common, **extra, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
                              PART_A=part_a, PART_B=part_b)
                names = {p.name for p in kernel.params if p.is_constexpr}  # the forward has no EVEN_KV
                k = _compile(kernel, elem, {n: v for n, v in consts.items() if n in names},
                             num_warps=c.num_warps, num_stages=c.num_stages)
                assert "ptx" in k.asm and 0 < k.metadata.shared <= 232448, (kernel, c, k.metadata.shared)
        k = _compile(wide_delta_kernel, elem, dict(BLOCK_M=DELTA_BLOCK[0], BLOCK_K=DELTA_BLOCK[1], VARLEN=True))
        assert "ptx" in k.asm


def _gemm_signature(elem: str, out: str, c: dict) -> dict:
    """Triton signature of gemm_kernel: descriptors (TMA) or pointers per the *_MODE flags."""
    def desc(rows, cols, batched, e):
        return f"tensordesc<{e}[{'1,' if batched else ''}{rows},{cols}]>"
    bm, bn, bk = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]
    a = {0: f"*{elem}", 1: desc(bm, bk, c["BATCHED_A"], elem), 2: desc(bk, bm, c["BATCHED_A"], elem)}
    b = {0: f"*{elem}", 1: desc(bk, bn, c["BATCHED_B"], elem), 2: desc(bn, bk, c["BATCHED_B"], elem)}
    sig = {}
    for p in gemm_kernel.params:
        sig[p.name] = ("constexpr" if p.is_constexpr else a[c["A_MODE"]] if p.name == "A" else b[c["B_MODE"]]
                       if p.name == "B" else (desc(bm, bn // c["EPILOGUE_SPLIT"], c["BATCHED_C"], out) if c["C_TMA"] else f"*{out}")
                       if p.name == "C" else f"*{out}" if p.name in ("Bias", "Pre") else "fp32"
                       if p.name == "alpha" else "i32")
    return sig


def compile_gemm_variants() -> None:
    """The GEMM kernel as gemm_launch runs it: every operand mode, the tuned tiles, fp32 paths."""
    from flashtile.gemm_launch import shipped_configs

    base = dict(GROUP_M=8, A_MODE=1, B_MODE=1, C_TMA=True, BATCHED_A=False, BATCHED_B=False, BATCHED_C=False,
                BIAS=1, ALPHA_ONE=True, ACTIVATION=2, STORE_PRE=False, DOT_PRECISION="ieee", FLATTEN=False,
                EPILOGUE_SPLIT=1, PTX=True)
    variants = []
    for kind, cfg, activation in shipped_configs():
        fp32 = kind != "16bit"
        variants.append(("fp32" if fp32 else "bf16", dict(
            base, ACTIVATION=2 if activation else 0, STORE_PRE=activation, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
            FLATTEN=cfg.flatten, C_TMA=cfg.tma_store,
            EPILOGUE_SPLIT=cfg.epilogue_split,
            A_MODE=int(cfg.tma), B_MODE=2 * int(cfg.tma), DOT_PRECISION="tf32" if kind == "tf32" else "ieee"),
            cfg.num_warps, cfg.num_stages))
    tile = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64)
    variants += [
        ("bf16", dict(base, **tile, A_MODE=2, B_MODE=1, ACTIVATION=3, STORE_PRE=True, ALPHA_ONE=False), 8, 3),
        ("fp16", dict(base, **tile, A_MODE=0, B_MODE=0, C_TMA=False, ACTIVATION=4, BIAS=0), 8, 3),
        ("bf16", dict(base, **tile, BATCHED_A=True, BATCHED_B=True, BATCHED_C=True, A_MODE=2, B_MODE=2,
                      ACTIVATION=1, BIAS=3, ALPHA_ONE=False), 8, 3),
        ("fp32", dict(base, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, DOT_PRECISION="tf32", A_MODE=2, BIAS=2), 8, 3),
    ]
    for elem, consts, warps, stages in variants:
        sig = _gemm_signature(elem, elem, consts)
        constants = {(i,): consts[p.name] for i, p in enumerate(gemm_kernel.params) if p.is_constexpr}
        k = triton.compile(ASTSource(gemm_kernel, sig, constants), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=warps, num_stages=stages))
        assert "ptx" in k.asm and k.metadata.shared <= 232448, (elem, consts)  # H100/H200: 227 KiB per block
        if elem != "fp32" and warps == 8 and stages >= 3 and consts["A_MODE"] and consts["B_MODE"]:
            # the TMA-fed tensor-core loop stays software-pipelined (one MMA group in flight while
            # the next loads land): a bias in the accumulator of a flattened loop once made it wait
            # for each MMA
            assert "wgmma.wait_group.sync.aligned 1" in k.asm["ptx"], ("MMA not pipelined", consts, stages)


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FLASHTILE_COMPILE_CHECK"] = "1"
    res = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stdout[-3000:] + res.stderr[-6000:]


if __name__ == "__main__":
    compile_all()


def test_sass_probe_finds_the_tensor_core_loop():
    """scripts/sass_probe.py (offline SASS per loop, docs/perf_notes.md session 16) still parses what
    ptxas / nvdisasm print: the dQ kernel's key-tile loop holds its wgmma and exp2 instructions."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(root, "src"), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, os.path.join(root, "scripts", "sass_probe.py"), "dq"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "registers" in res.stdout
    loops = [line for line in res.stdout.splitlines() if line.strip().startswith("loop")]
    assert any("HGMMA" in line and "MUFU.EX2" in line for line in loops), res.stdout
