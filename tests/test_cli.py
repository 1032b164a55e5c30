"""The command line (info / verify / bench) and the benchmark harness, without a GPU.

Nothing here times anything: the runner is exercised on CPU tensors with a fake timer, and the
report is rendered from synthetic results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from flashtile.__main__ import main
from flashtile.bench import report, runner, suites
from flashtile.bench.peers import PROVIDERS, Provider, _attention
from flashtile.bench.suites import SUITES, attention_case, attention_flops, filter_cases, tflops
from flashtile.bench.validate import compare

ROOT = Path(__file__).resolve().parents[1]

# The variants suite at CPU size (float32: the Triton interpreter has no bfloat16).
TINY = suites.VariantSizes(d=16, heads=2, window_s=128, window=16, s=128, softcap_b=1, gqa_hq=4, gqa_hkv=2,
                           varlen_tokens=128, varlen_seqs=3, min_len=8, block=32, docs=3, dtype="float32")


def _run_module(*args: str) -> subprocess.CompletedProcess:
    """python -m flashtile ... from the source tree, on CPU."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), CUDA_VISIBLE_DEVICES="")
    return subprocess.run(
        [sys.executable, "-m", "flashtile", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


# ----------------------------------------------------------------------------------------------
# info


def test_info_subprocess_names_backend():
    proc = _run_module("info")
    assert proc.returncode == 0, proc.stderr
    assert "backend for CPU tensors" in proc.stdout
    assert "backend setting" in proc.stdout
    assert "torch" in proc.stdout and "triton" in proc.stdout


def test_info_reports_versions_and_backends(capsys):
    from flashtile.info import collect_info

    info = collect_info()
    for key in ("flashtile", "python", "torch", "triton", "numpy", "device", "backend_setting", "backend_cpu"):
        assert key in info
    assert info["backend_cpu"] in ("cpu", "triton", "reference") or info["backend_cpu"].startswith("error")
    # the Gluon wide forward runs on sm_90 only, and says why not elsewhere
    hopper = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
    assert info["gluon_wide_forward"].startswith("yes" if hopper else "no (")
    assert main(["info"]) == 0
    assert "backend for CUDA tensors" in capsys.readouterr().out


def test_verify_forwards_arguments(monkeypatch):
    calls = []
    fake = types.ModuleType("flashtile.verify")

    def run_verify(backends=None, quick=False):
        calls.append((backends, quick))
        return 3

    fake.run_verify = run_verify
    monkeypatch.setitem(sys.modules, "flashtile.verify", fake)
    assert main(["verify", "--backend", "cpu", "--backend", "reference", "--quick"]) == 3
    assert main(["verify"]) == 3
    assert calls == [(["cpu", "reference"], True), (None, False)]


def test_usage_errors_return_codes(capsys):
    assert main([]) == 2
    assert main(["--help"]) == 0
    assert main(["bench", "--help"]) == 0
    assert main(["bench", "--suite", "nope"]) == 2
    assert main(["bench", "--dry-run", "--providers", "nope"]) == 2
    assert main(["bench", "--dry-run", "--seqlens", "3"]) == 2  # no case matches
    assert main(["bench", "--dry-run", "--suite", "variants", "--variants", "nope"]) == 2
    assert main(["bench", "--dry-run", "--suite", "standard", "--variants", "window"]) == 2
    capsys.readouterr()


# ----------------------------------------------------------------------------------------------
# bench --dry-run and the case lists


def test_bench_dry_run_subprocess_lists_72_cases():
    proc = _run_module("bench", "--dry-run", "--suite", "standard")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "72 cases"
    assert sum(1 for line in lines if line.lstrip()[:1].isdigit() and ". D=" in line) == 72


@pytest.mark.parametrize(
    "args, count",
    [
        (["--suite", "standard"], 72),
        (["--suite", "standard", "--headdims", "64", "--modes", "fwd"], 12),
        (["--suite", "standard", "--seqlens", "512,1024", "--causal", "yes"], 12),
        (["--suite", "standard", "--quick"], 24),
        (["--suite", "wide"], 48),
        (["--suite", "headdims"], 32),
        (["--suite", "headdims", "--quick", "--headdims", "96"], 4),
        (["--suite", "wide", "--causal", "no", "--modes", "fwd"], 12),
        (["--suite", "variants"], 28),
        (["--suite", "variants", "--quick"], 14),
        (["--suite", "variants", "--causal", "no"], 14),
        (["--suite", "variants", "--variants", "dropout"], 4),
        (["--suite", "variants", "--variants", "block_sparse", "--modes", "fwd"], 4),
        (["--suite", "variants", "--variants", "window,varlen", "gqa"], 8),
        (["--suite", "variants", "--seqlens", "16384"], 6),
    ],
)
def test_bench_dry_run_counts(args, count, capsys):
    assert main(["bench", "--dry-run", *args]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"{count} cases"


def test_bench_without_cuda_says_so(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["bench", "--suite", "standard", "--out", str(tmp_path)]) == 2
    assert "CUDA" in capsys.readouterr().err


def test_bench_variants_dry_run_subprocess_lists_cases():
    proc = _run_module("bench", "--suite", "variants", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "28 cases"
    listed = [line for line in lines if line.lstrip()[:1].isdigit() and ". variant=" in line]
    assert len(listed) == 28
    text = "\n".join(listed)
    for needle in ("variant=window setting=(1024, 0) causal=yes B=1 H=16 S=16384",
                   "variant=window setting=(1024, 1024) causal=no",
                   "variant=softcap setting=30 causal=no B=2 H=16 S=8192",
                   "variant=alibi setting=2^(-8(h+1)/H) causal=yes B=2 H=16 S=8192",
                   "variant=dropout setting=p=0.1 causal=no B=2 H=16 S=8192",
                   "variant=gqa setting=Hkv=8 causal=yes B=1 H=32 S=8192",
                   "variant=varlen setting=16 seqs causal=yes B=1 H=16 S=16384",
                   "variant=block_sparse setting=random 25% causal=no B=1 H=16 S=8192 visible=25.0%",
                   "variant=block_sparse setting=random 10%",
                   "variant=block_sparse setting=random 50%",
                   "variant=block_sparse setting=document x8 causal=yes"):
        assert text.count(needle) == 2, needle  # fwd and fwd_bwd
    assert "Hkv=8" in text and "flashtile_dense" in text and "flex" in text


def test_variants_suite_definition():
    cases = suites.variants_suite()
    assert len(cases) == 28 and len({c.key for c in cases}) == 28
    for c in cases:
        s = c.shape
        assert c.dtype == "bfloat16" and s["D"] == 128 and c.kind == "attention"
        assert c.providers[:2] == ("flashtile", "flashtile_dense")
        if s["variant"] == "dropout":  # random output: no reference, SDPA FLASH's dropout as the peer
            assert c.references == () and c.providers[2:] == ("sdpa_flash",) and s["dropout_p"] == 0.1
            continue
        assert "flex" in c.providers and c.references[0] == "torch_ref"
        # flashtile_dense's FLOPs are the dense ones on the same shape, whatever the variant
        assert c.flops_for("flashtile_dense") == attention_flops(s["B"], s["H"], s["Sq"], s["Sk"], s["D"],
                                                                 s["causal"], c.mode)
        assert c.flops_for("flex") == c.flops
        assert c.flops <= c.flops_for("flashtile_dense") * (1 + 1e-3)
        if s["variant"] == "varlen":
            assert "sdpa_flash" in c.skip  # per-sequence SDPA is not a fair peer
        if s["variant"] == "gqa":
            assert (s["H"], s["Hkv"]) == (32, 8) and {"sdpa_flash", "sdpa_cudnn"} <= set(c.providers) and not c.skip
    by = {(c.shape["variant"], c.labels["setting"], c.mode): c for c in cases}
    # density of the random block masks is exact (diagonal blocks included in the count)
    for pct in (50, 25, 10):
        c = by[("block_sparse", f"random {pct}%", "fwd")]
        assert c.flops / c.flops_for("flashtile_dense") == pytest.approx(pct / 100, abs=1e-3)
    # round trip through JSON keeps the per-provider FLOPs
    c = by[("window", "(1024, 0)", "fwd_bwd")]
    back = suites.case_from_dict(json.loads(json.dumps(c.to_dict())))
    assert back.key == c.key and back.flops_for("flashtile_dense") == c.flops_for("flashtile_dense")


def test_standard_suite_shapes():
    cases = suites.standard_suite()
    assert len(cases) == 72
    for c in cases:
        s = c.shape
        assert s["B"] * s["Sq"] == 16384 and s["H"] * s["D"] == 2048
        assert c.dtype == "bfloat16" and c.kind == "attention"
        assert c.providers[0] == "flashtile" and "sdpa_flash" in c.references
        # math is skipped exactly when its float32 scores would exceed the limit
        assert ("sdpa_math" in c.skip) == (4 * s["B"] * s["H"] * s["Sq"] * s["Sk"] >= suites.MATH_SCORES_LIMIT_BYTES)
    assert len({c.key for c in cases}) == 72


def test_head_dim_suite_shapes():
    from flashtile.tuning import head_dim_chunks

    cases = suites.head_dim_suite()
    assert {c.shape["D"] for c in cases} == {80, 96, 160, 192}
    for c in cases:
        s = c.shape
        assert s["B"] * s["Sq"] == 16384 and s["H"] == 2048 // s["D"]
        assert head_dim_chunks(s["D"])[1] > 0  # each runs the two-chunk kernels
        assert c.providers[0] == "flashtile" and "sdpa_cudnn" in c.references
    assert len({c.key for c in cases}) == len(cases) == 32


def test_wide_suite_shapes():
    cases = suites.wide_suite()
    assert {c.shape["D"] for c in cases} == set(range(320, 1025, 64))
    assert all(c.shape["B"] == 1 and c.shape["H"] == 48 and c.shape["Sq"] == 8192 for c in cases)
    assert all(set(c.providers) == {"flashtile", "sdpa_efficient", "sdpa_math"} for c in cases)


def test_filter_narrows_providers():
    cases = filter_cases(suites.standard_suite(), providers=["flashtile", "sdpa_math"], seqlens=[16384])
    assert cases and all(c.providers == ("flashtile", "sdpa_math") for c in cases)
    assert all(set(c.skip) <= {"sdpa_math"} for c in cases)
    assert filter_cases(suites.standard_suite(), providers=["nobody"]) == []


# ----------------------------------------------------------------------------------------------
# FLOPs


def test_flop_formula():
    fwd = 4 * 2 * 3 * 128 * 128 * 64
    assert attention_flops(2, 3, 128, 128, 64, False, "fwd") == fwd
    assert attention_flops(2, 3, 128, 128, 64, True, "fwd") == fwd / 2
    assert attention_flops(2, 3, 128, 128, 64, False, "fwd_bwd") == 3.5 * fwd
    assert attention_flops(2, 3, 128, 128, 64, True, "fwd_bwd") == 3.5 * fwd / 2
    # causal with Sq != Sk is not a triangle: no halving
    assert attention_flops(1, 1, 64, 128, 64, True, "fwd") == 4 * 64 * 128 * 64
    with pytest.raises(ValueError):
        attention_flops(1, 1, 1, 1, 1, False, "bwd")
    assert tflops(2e12, 1000.0) == pytest.approx(2.0)
    # the standard suite does the same work at every S: 4 * 16384 * 2048 * S
    for c in suites.standard_suite():
        base = 4.0 * 16384 * 2048 * c.shape["Sq"] * (0.5 if c.shape["causal"] else 1.0)
        assert c.flops == pytest.approx(base * (3.5 if c.mode == "fwd_bwd" else 1.0))


def test_masked_flops_count_visible_pairs_tiny():
    """FLOPs of a masked case = 4 * B * H * D per visible (i, j) pair, counted exactly."""
    # S = 8, causal window (2, 0): rows see 1, 2, 3, 3, 3, 3, 3, 3 keys = 21 pairs of 64
    assert suites.visible_pairs_window(8, 8, 2, 0) == 21
    assert suites.visible_pairs_window(8, 8, 2, 1) == 21 + 7  # one more key right of the diagonal, but row 7
    assert suites.visible_pairs_window(8, 8, -1, 0) == 36  # plain causal: S (S + 1) / 2
    assert suites.visible_pairs_window(8, 8, -1, -1) == 64
    assert suites.visible_pairs_documents([3, 5], causal=True) == 6 + 15
    assert suites.visible_pairs_documents([3, 5], causal=False) == 9 + 25
    assert suites.visible_pairs_blocks([[True, False], [True, True]], 4, 4, 6, 7) == 4 * 4 + 2 * 4 + 2 * 3
    c = suites._variant_case("window", "(2, 0)", b=3, h=2, hkv=2, s=8, d=16, causal=True, mode="fwd",
                             providers=("flashtile", "flashtile_dense"), window_left=2, window_right=0)
    assert c.flops == 4 * 3 * 2 * 16 * 21
    assert c.labels["visible"] == f"{100 * 21 / 64:.1f}%"
    assert c.flops_for("flashtile_dense") == 4 * 3 * 2 * 8 * 8 * 16 / 2  # dense causal convention
    bwd = suites._variant_case("window", "(2, 0)", b=3, h=2, hkv=2, s=8, d=16, causal=True, mode="fwd_bwd",
                               providers=("flashtile",), window_left=2, window_right=0)
    assert bwd.flops == 3.5 * c.flops
    # seeded lengths and tables: deterministic, right totals, exact density
    lengths = suites.doc_lengths(1000, 7, seed=3, min_len=20)
    assert sum(lengths) == 1000 and len(lengths) == 7 and min(lengths) >= 20
    assert lengths == suites.doc_lengths(1000, 7, seed=3, min_len=20) != suites.doc_lengths(1000, 7, seed=4, min_len=20)
    table = suites.random_block_table(8, 8, 0.25, seed=1)
    assert sum(map(sum, table)) == 16 and all(table[r][r] for r in range(8))


def test_masked_flops_match_the_masks_on_the_device_side():
    """The pure-Python pair count equals what flashtile's BlockMask and Flex's mask_mod see."""
    from flashtile.bench import variants
    from flashtile.masks import visibility_mask

    cpu = torch.device("cpu")
    for c in suites.variants_suite(sizes=TINY):
        s = c.shape
        if c.mode != "fwd" or s["variant"] not in suites.MASK_VARIANTS:
            continue
        _, mask_mod = variants.mods(s, cpu)
        qi, kj = torch.arange(s["Sq"]).unsqueeze(1), torch.arange(s["Sk"]).unsqueeze(0)
        flex_mask = mask_mod(torch.tensor(0), torch.tensor(0), qi, kj).expand(s["Sq"], s["Sk"])
        kw = variants.flashtile_kwargs(s, cpu)
        if "block_mask" in kw:
            mine = kw["block_mask"].dense()[0, 0]
        elif s["variant"] == "window":
            mine = visibility_mask(s["Sq"], s["Sk"], kw["causal"], kw["window_size"])
        else:  # varlen: causal within each sequence
            ids = variants.doc_ids(s, cpu)
            mine = (ids[:, None] == ids[None, :]) & visibility_mask(s["Sq"], s["Sk"], True)
        assert torch.equal(flex_mask, mine), c.name
        pairs = int(mine.sum())
        assert pairs == suites.visible_pairs(s), c.name
        assert c.flops == pytest.approx(4.0 * s["B"] * s["H"] * s["D"] * pairs), c.name
        assert c.labels["visible"] == f"{100 * pairs / (s['Sq'] * s['Sk']):.1f}%"
    # the suite's own block-sparse masks at full size (S = 8192): flashtile's BlockMask agrees too
    for c in suites.variants_suite():
        if c.mode == "fwd" and c.shape["variant"] == "block_sparse":
            bm = variants.flashtile_kwargs(c.shape, cpu)["block_mask"]
            assert int(bm.dense().sum()) == suites.visible_pairs(c.shape), c.name


def test_variants_suite_needs_no_cuda_at_import():
    code = (
        "import sys, torch\n"
        "import flashtile.bench.suites as s, flashtile.bench.variants as v, flashtile.bench.cli as cli\n"
        "cases = s.SUITES['variants'].build(False) + s.SUITES['variants'].build(True)\n"
        "assert len(cases) == 42\n"
        "tiny = s.variants_suite(sizes=s.VariantSizes(d=16, heads=2, window_s=128, window=16, s=128, gqa_hq=4,\n"
        "    gqa_hkv=2, varlen_tokens=128, varlen_seqs=3, min_len=8, block=32, docs=3))\n"
        "for c in tiny:\n"
        "    v.flashtile_kwargs(c.shape, torch.device('cpu'))\n"
        "    if c.shape['variant'] != 'dropout':\n"
        "        v.mods(c.shape, torch.device('cpu'))\n"
        "assert cli.main(['--suite', 'variants', '--dry-run']) == 0\n"
        "assert not torch.cuda.is_initialized()\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    # the suite definition itself is plain Python: no torch import at all
    assert "import torch" not in (ROOT / "src/flashtile/bench/suites.py").read_text()


# ----------------------------------------------------------------------------------------------
# validation


def test_compare_catches_wrong_outputs():
    g = torch.Generator().manual_seed(0)
    ref = {"out": torch.randn(2, 64, 2, 16, generator=g)}
    close = {"out": ref["out"] + 1e-3}
    assert compare(close, ref)[0]
    assert not compare({"out": ref["out"] + 0.5}, ref)[0]
    nan = ref["out"].clone()
    nan[0, 0, 0, 0] = float("nan")
    assert not compare({"out": nan}, ref)[0]
    assert not compare({}, ref)[0]
    # a small-magnitude output with a dropped slice: within 2e-2 everywhere but wrong in bulk
    small = {"out": ref["out"] * 0.01}
    dropped = {"out": small["out"].clone()}
    dropped["out"][:, :32] = 0
    assert not compare(dropped, small)[0]


# ----------------------------------------------------------------------------------------------
# the runner, end to end on CPU with a fake timer


def _broken_build(case, inputs):
    """A provider that ignores causality: must be reported as wrong, never timed."""
    import torch.nn.functional as F

    def call(q, k, v):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)

    return _attention(case, inputs, layout="bhsd", call=call)


def _failing_build(case, inputs):
    raise NotImplementedError("head dim not supported yet")


def test_runner_rounds_interleave_providers_and_keep_the_median(monkeypatch, tmp_path):
    """--rounds 3: every timed provider is timed once per round, rounds in provider order (A B A B A B),
    and a cell keeps the median of its rounds (with TFLOP/s from it)."""
    order, values = [], {"sdpa_math": iter([5.0, 1.0, 3.0]), "sdpa_flash": iter([2.0, 8.0, 4.0])}

    def fake_median(fn, **kw):
        name = fn.__qualname__.split(".")[0]
        order.append(name)
        return next(values[name])

    def provider(name):
        original = PROVIDERS[name].build

        def build(case, inputs):
            prepared = original(case, inputs)
            fn = prepared.fn

            def timed():
                return fn()
            timed.__qualname__ = name + ".timed"
            return replace(prepared, fn=timed)
        return build

    for name in ("sdpa_math", "sdpa_flash"):
        monkeypatch.setitem(PROVIDERS, name, Provider(name, "attention", "test", provider(name)))
    monkeypatch.setattr(runner, "median_ms", fake_median)
    monkeypatch.setattr(runner, "warm_up", lambda fn, calls=2: None)
    case = attention_case("standard", b=1, h=2, s=64, d=16, causal=False, mode="fwd",
                          providers=("sdpa_math", "sdpa_flash"), references=("sdpa_math",), dtype="float32")
    cells = runner.run_case(case, runner.RunOptions(out_dir=tmp_path, device="cpu", rounds=3))
    assert order == ["sdpa_math", "sdpa_flash"] * 3
    assert cells["sdpa_math"]["median_ms"] == 3.0 and cells["sdpa_flash"]["median_ms"] == 4.0
    assert cells["sdpa_math"]["round_ms"] == [5.0, 1.0, 3.0]
    assert cells["sdpa_flash"]["tflops"] == pytest.approx(case.flops / 4e-3 / 1e12)


def test_runner_records_ok_wrong_error_and_skip(monkeypatch, tmp_path):
    timed = []

    def fake_median(fn, **kw):
        fn()
        timed.append(fn)
        return 2.0

    monkeypatch.setattr(runner, "median_ms", fake_median)
    monkeypatch.setattr(runner, "warm_up", lambda fn, calls=2: fn())
    monkeypatch.setitem(PROVIDERS, "broken", Provider("broken", "attention", "test", _broken_build))
    monkeypatch.setitem(PROVIDERS, "failing", Provider("failing", "attention", "test", _failing_build))
    providers = ("sdpa_math", "broken", "failing", "sdpa_flash")
    cases = [
        attention_case("standard", b=1, h=2, s=s, d=16, causal=True, mode=mode, providers=providers,
                       references=("sdpa_math", "sdpa_flash"), dtype="float32", math_limit=4 * 2 * 64 * 64 + 1)
        for mode in ("fwd", "fwd_bwd")
        for s in (64, 96)
    ]
    opts = runner.RunOptions(out_dir=tmp_path, device="cpu")
    doc, code = runner.run_suite(SUITES["standard"], cases, opts, {"device": "test", "date": "2026-01-01"})
    assert code == 0
    assert len(doc["results"]) == 4
    for entry in doc["results"]:
        cells = entry["cells"]
        assert cells["broken"]["status"] == "wrong" and cells["broken"]["tflops"] is None
        assert cells["failing"]["status"] == "error" and "not supported" in cells["failing"]["reason"]
        assert cells["sdpa_flash"]["status"] == "ok"
        if entry["case"]["shape"]["Sq"] == 96:  # math skipped: sdpa_flash is the reference
            assert cells["sdpa_math"]["status"] == "skipped" and "GB" in cells["sdpa_math"]["reason"]
            assert cells["sdpa_flash"]["reference"] == "sdpa_flash"
        else:
            assert cells["sdpa_math"]["status"] == "ok" and cells["sdpa_flash"]["reference"] == "sdpa_math"
            assert set(cells["sdpa_flash"]["check"]) == ({"out"} if entry["case"]["mode"] == "fwd" else {"out", "dq", "dk", "dv"})
        for p in ("sdpa_math", "sdpa_flash"):
            if cells[p]["status"] == "ok":
                assert cells[p]["median_ms"] == 2.0
                assert cells[p]["tflops"] == pytest.approx(entry["case"]["flops"] / 2e-3 / 1e12)
    saved = report.load_json(tmp_path / "standard.json")
    assert len(saved["results"]) == 4

    # --resume skips what is done; a rerun of one provider merges into the same file cell by cell
    opts2 = runner.RunOptions(out_dir=tmp_path, device="cpu", resume=True)
    n = len(timed)
    doc2, _ = runner.run_suite(SUITES["standard"], cases, opts2, {"device": "test", "date": "2026-01-02"})
    assert len(timed) == n
    only_math = filter_cases(cases, providers=["sdpa_math"])
    doc3, _ = runner.run_suite(SUITES["standard"], only_math, runner.RunOptions(out_dir=tmp_path, device="cpu"),
                               {"device": "test", "date": "2026-01-03"})
    assert len(doc3["runs"]) == 2  # the --resume run measured nothing, so it is not recorded
    assert all("broken" in e["cells"] for e in doc3["results"])

    # no reference at all: speeds are recorded but flagged as unchecked
    lone = [attention_case("standard", b=1, h=1, s=32, d=8, causal=False, mode="fwd", providers=("broken",),
                           references=(), dtype="float32")]
    doc4, _ = runner.run_suite(SUITES["standard"], lone, runner.RunOptions(out_dir=tmp_path / "lone", device="cpu"), {})
    assert doc4["results"][0]["cells"]["broken"]["status"] == "unchecked"
    assert report.format_cell(doc4["results"][0]["cells"]["broken"]).endswith("?")


def test_runner_variants_validate_flashtile_and_dense_baseline(monkeypatch, tmp_path):
    """Variants on CPU: flashtile (Triton interpreter) agrees with torch_ref, the Flex mods' dense
    evaluation, on every variant; flashtile_dense is checked against its own dense reference and
    gets the dense FLOPs; a peer that ignores the mask is caught; unsupported peers are errors."""
    if torch.cuda.is_available():
        pytest.skip("runs flashtile on CPU tensors through Triton's interpreter, which is off on a GPU machine")
    # The timed callable runs once (in the fake warm-up); the interpreter is slow.
    monkeypatch.setattr(runner, "median_ms", lambda fn, **kw: 2.0)
    monkeypatch.setattr(runner, "warm_up", lambda fn, calls=2: fn())
    monkeypatch.setitem(PROVIDERS, "broken", Provider("broken", "attention", "ignores every mask", _broken_build))
    cases = [c for c in suites.variants_suite(sizes=TINY) if c.shape["variant"] != "dropout"
             and (c.mode == "fwd" or c.labels["setting"] in ("random 25%", "Hkv=2"))]
    # sdpa_efficient (ALiBi bias) has no CPU kernel: it must fail alone, as an error cell
    cases = filter_cases(cases, providers=["flashtile", "flashtile_dense", "sdpa_efficient", "broken"])
    cases = [replace(c, providers=c.providers + ("broken",)) if c.shape["variant"] == "block_sparse" else c
             for c in cases]
    assert len(cases) == 14
    doc, code = runner.run_suite(SUITES["variants"], cases, runner.RunOptions(out_dir=tmp_path, device="cpu"),
                                 {"device": "test"})
    assert code == 0 and len(doc["results"]) == 14
    for entry in doc["results"]:
        case, cells = suites.case_from_dict(entry["case"]), entry["cells"]
        where = case.name
        assert cells["flashtile"]["status"] == "ok" and cells["flashtile"]["reference"] == "torch_ref", (where, cells["flashtile"])
        assert cells["flashtile_dense"]["status"] == "ok", (where, cells["flashtile_dense"])
        assert cells["flashtile_dense"]["reference"] == "torch_ref (dense)"
        expect = {"out"} if case.mode == "fwd" else {"out", "dq", "dk", "dv"}
        assert set(cells["flashtile"]["check"]) == expect == set(cells["flashtile_dense"]["check"])
        assert cells["flashtile"]["tflops"] == pytest.approx(case.flops / 2e-3 / 1e12)
        assert cells["flashtile_dense"]["tflops"] == pytest.approx(case.flops_for("flashtile_dense") / 2e-3 / 1e12)
        if case.shape["variant"] == "block_sparse":
            assert cells["broken"]["status"] == "wrong" and cells["broken"]["tflops"] is None
        if case.shape["variant"] == "alibi":
            assert cells["sdpa_efficient"]["status"] == "error" and cells["sdpa_efficient"]["reason"]
    text = report.write_report(doc, tmp_path)["text"]
    assert "| vs flashtile dense | time / dense |" in text
    # dropout: a random output has no reference, so flashtile is timed but marked unchecked
    drop = [c for c in suites.variants_suite(sizes=TINY) if c.shape["variant"] == "dropout" and c.mode == "fwd"]
    drop = filter_cases(drop[:1], providers=["flashtile", "flashtile_dense"])
    doc2, code = runner.run_suite(SUITES["variants"], drop, runner.RunOptions(out_dir=tmp_path / "drop", device="cpu"),
                                  {"device": "test"})
    cells = doc2["results"][0]["cells"]
    assert code == 0 and cells["flashtile"]["status"] == "unchecked" and cells["flashtile"]["tflops"] > 0
    assert cells["flashtile_dense"]["status"] == "ok"
    assert (tmp_path / "variants_fwd.png").read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------------------------
# report


def _synthetic_document() -> dict:
    """Results for the quick standard suite with every kind of cell."""
    doc = report.new_document(SUITES["standard"].layout())
    doc["runs"].append({"date": "2026-11-20 12:00 UTC", "device": "NVIDIA H200", "capability": "sm_90",
                        "torch": "2.11.0+cu130", "cuda": "13.0", "triton": "3.6.0", "cudnn": "9.19.0",
                        "python": "3.12.3", "flashtile": "0.1.0", "warmup_ms": 25, "rep_ms": 100})
    speeds = {"flashtile": 400.0, "sdpa_flash": 300.0, "sdpa_cudnn": 500.0, "sdpa_efficient": 150.0, "sdpa_math": 40.0, "flex": 380.0}
    for i, case in enumerate(suites.standard_suite(quick=True)):
        cells = {}
        for p in case.providers:
            if p in case.skip:
                cells[p] = {"status": "skipped", "reason": case.skip[p], "median_ms": None, "tflops": None}
            elif p == "flex" and case.shape["D"] == 128 and case.mode == "fwd_bwd":
                cells[p] = {"status": "error", "reason": "OutOfMemoryError: out of shared memory", "median_ms": None, "tflops": None}
            elif p == "flashtile" and i == 3:
                cells[p] = {"status": "wrong", "reason": "differs from sdpa_flash", "median_ms": None, "tflops": None,
                            "check": {"out": {"max_abs": float("inf"), "rel_rms": 0.5}}}
            else:
                t = speeds[p] * (1 + 0.01 * i)
                cells[p] = {"status": "ok", "tflops": t, "median_ms": case.flops / t / 1e9, "reason": None}
        report.add_cells(doc, case.to_dict(), cells)
    return doc


def test_report_renders_table_json_png(tmp_path):
    doc = _synthetic_document()
    written = report.write_report(doc, tmp_path)
    text = written["text"]
    assert "NVIDIA H200" in text and "torch 2.11.0+cu130" in text and "cuDNN 9.19.0" in text
    assert "| D | causal | S | mode | flashtile | sdpa_flash | sdpa_cudnn | sdpa_efficient | sdpa_math | flex |" in text
    assert "vs sdpa_flash" in text and "vs sdpa_cudnn" in text and "vs flex" in text and "vs best" in text
    assert "| 64 | no | 1024 | fwd | 400.0 | 300.0 | 500.0 | 150.0 | 40.0 | 380.0 | 1.33 | 0.80 | 1.05 | 0.80 (sdpa_cudnn) |" in text
    assert "wrong" in text and "### Notes" in text and "out of shared memory" in text
    assert (tmp_path / "standard.md").read_text() == text
    for mode in ("fwd", "fwd_bwd"):
        png = tmp_path / f"standard_{mode}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(written["png"]) == sorted([tmp_path / "standard_fwd.png", tmp_path / "standard_fwd_bwd.png"])
    # strict JSON (no bare Infinity), and the markdown can be rebuilt from it alone
    raw = (tmp_path / "standard.json").read_text()
    json.loads(raw, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert report.render_json_file(tmp_path / "standard.json") == text


def test_report_merges_runs_cell_by_cell(tmp_path):
    a = _synthetic_document()
    b = report.new_document(SUITES["standard"].layout())
    b["runs"].append({"date": "2026-11-21 12:00 UTC", "device": "NVIDIA H200"})
    first = a["results"][0]
    report.add_cells(b, first["case"], {"flashtile": {"status": "ok", "tflops": 999.0, "median_ms": 1.0}})
    report.save_json(a, tmp_path / "a.json")
    report.save_json(b, tmp_path / "b.json")
    out = tmp_path / "merged"
    assert main(["bench", "--from-json", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(out), "--no-plots"]) == 0
    merged = report.load_json(out / "standard.json")
    cells = next(e["cells"] for e in merged["results"] if e["case"]["key"] == first["case"]["key"])
    assert cells["flashtile"]["tflops"] == 999.0 and cells["sdpa_cudnn"]["status"] == "ok"
    assert len(merged["runs"]) == 2 and len(merged["results"]) == len(a["results"])
    assert "2 runs" in (out / "standard.md").read_text()


def test_report_wide_suite_layout(tmp_path):
    doc = report.new_document(SUITES["wide"].layout())
    for case in suites.wide_suite(quick=True):
        cells = {p: {"status": "ok", "tflops": 100.0 + case.shape["D"] / 10, "median_ms": 1.0} for p in case.providers}
        cells["flashtile"] = {"status": "error", "reason": "UnsupportedError: head_dim 320 > 256", "median_ms": None, "tflops": None}
        report.add_cells(doc, case.to_dict(), cells)
    written = report.write_report(doc, tmp_path)
    assert "vs sdpa_efficient" in written["text"] and "vs flex" not in written["text"]
    assert (tmp_path / "wide_fwd.png").exists()


def _variants_document() -> dict:
    """Synthetic variants results: flashtile at 0.3x / 0.5x dense time on the 25% block mask."""
    doc = report.new_document(SUITES["variants"].layout())
    doc["runs"].append({"date": "2026-11-22 12:00 UTC", "device": "NVIDIA H200", "warmup_ms": 25, "rep_ms": 100})
    for case in suites.variants_suite(quick=True):
        ratio = {"fwd": 0.3, "fwd_bwd": 0.5}[case.mode] if case.labels["setting"] == "random 25%" else 0.8
        times = {"flashtile": 10.0 * ratio, "flashtile_dense": 10.0, "flex": 12.0 * ratio, "sdpa_flash": 11.0 * ratio,
                 "sdpa_cudnn": 9.0 * ratio, "sdpa_efficient": 20.0 * ratio}
        cells = {}
        for p in case.providers:
            if p in case.skip:
                cells[p] = {"status": "skipped", "reason": case.skip[p], "median_ms": None, "tflops": None}
            else:
                cells[p] = {"status": "ok", "median_ms": times[p], "tflops": tflops(case.flops_for(p), times[p])}
        report.add_cells(doc, case.to_dict(), cells)
    return doc


def test_report_variants_dense_ratio_columns_and_target(tmp_path):
    doc = _variants_document()
    written = report.write_report(doc, tmp_path)
    text = written["text"]
    header = ("| variant | setting | causal | B | H | S | visible | mode | flashtile | flashtile_dense | sdpa_flash | flex "
              "| sdpa_efficient | sdpa_cudnn | vs flashtile dense | time / dense | vs flex | vs best |")
    assert header in text
    # 25% block mask, fwd: flashtile 3 ms vs dense 10 ms on 25% of the work: TFLOP/s ratio 0.25 / 0.3
    row = next(line for line in text.splitlines() if line.startswith("| block_sparse | random 25% |") and "| fwd |" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    # (vs flex: 3.6 ms / 3 ms; SDPA is skipped there, so Flex is also the best peer)
    assert cells[-4:] == [f"{0.25 / 0.3:.2f}", "0.30", "1.20", "1.20 (flex)"]
    # the dense baseline is never "best peer", even where it is fastest
    assert "(flashtile_dense)" not in text
    # GQA row: cuDNN is the best peer (9 vs 10 ms)
    gqa = next(line for line in text.splitlines() if line.startswith("| gqa |") and "| fwd |" in line)
    assert gqa.rstrip(" |").endswith("(sdpa_cudnn)")
    assert "### Targets" in text
    assert "time <= 0.35x flashtile dense: fwd: 0.30, met; fwd_bwd: 0.50, not met" in text
    assert "count only visible (i, j) pairs" in text and "flashtile_dense: flashtile on the same" in text
    assert "SDPA FLASH run per sequence is not a fair peer" in text
    for mode in ("fwd", "fwd_bwd"):
        assert (tmp_path / f"variants_{mode}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.render_json_file(tmp_path / "variants.json") == text
    # older suites keep their layout (and files) unchanged
    assert set(SUITES["standard"].layout()) == {"name", "description", "x", "group", "subject", "ratio_peers"}
    assert "provider_flops" not in suites.standard_suite()[0].to_dict()


def test_bench_package_imports_without_cuda():
    code = (
        "import torch, flashtile.bench, flashtile.bench.peers, flashtile.bench.runner, flashtile.bench.cli,"
        " flashtile.bench.variants;"
        "assert not torch.cuda.is_initialized()"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
