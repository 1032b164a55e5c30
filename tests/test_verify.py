"""`python -m flashtile verify` passes on every backend this machine has, and fails loudly when wrong."""

import flashtile
from flashtile import verify


def test_verify_passes_on_available_backends(capsys):
    assert verify.run_verify(quick=True) == 0
    printed = capsys.readouterr().out
    assert "cpu" in printed and "PASS" in printed and "FAIL" not in printed


def test_verify_reports_a_wrong_backend(monkeypatch, capsys):
    real = flashtile.flash_attn_func

    def off_by_a_bit(*args, **kwargs):
        res = real(*args, **kwargs)
        if isinstance(res, tuple):
            return (res[0] * 1.01,) + tuple(res[1:])
        return res * 1.01

    monkeypatch.setattr(flashtile, "flash_attn_func", off_by_a_bit)
    assert verify.run_verify(backends=["cpu"], quick=True) == 1
    assert "FAIL" in capsys.readouterr().out
