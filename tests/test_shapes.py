"""The one size table (`hmst_bench.arch.DENSE_SHAPES`) and SwiGLU width rule (`swiglu_width`)
that the built-in architectures share: widths checked by hand, every architecture of a size on
the dense baselines' tokenizer and window, and the table read-only."""

import pytest

from hmst_bench.arch import DENSE_SHAPES, SIZE_NAMES, swiglu_width
from hmst_bench_baselines.plugin import DENSE_GPT2, DENSE_LLAMA
from hmst_bench_gpt2_hsm.plugin import GPT2_HSM
from hmst_bench_hmst.plugin import HMST
from hmst_bench_hrm_codegen.plugin import HRM_CODEGEN

ALL = (DENSE_LLAMA, DENSE_GPT2, HMST, HRM_CODEGEN, GPT2_HSM)
# floor(8 * d / 3) rounded up to a multiple of 64: 170 -> 192, 682 -> 704, 1365 -> 1408, 2048 -> 2048
WIDTH_BY_SIZE = {"micro": 192, "tiny": 704, "small": 1408, "base": 2048}


def test_swiglu_width_by_hand():
    assert [swiglu_width(d, 64) for d in (64, 256, 512, 768)] == [192, 704, 1408, 2048]
    assert swiglu_width(100, 1) == 266  # 800 / 3 = 266.7 is floored, then no rounding
    assert swiglu_width(256, 256) == 768  # 682 rounds up to 3 * 256
    assert swiglu_width(3, 2) == 8  # 8 is already a multiple of 2


def test_the_table_has_every_size_and_is_read_only():
    assert tuple(DENSE_SHAPES) == SIZE_NAMES
    with pytest.raises(TypeError):
        DENSE_SHAPES["micro"]["d_model"] = 1
    with pytest.raises(TypeError):
        DENSE_SHAPES["huge"] = {}


@pytest.mark.parametrize("size", SIZE_NAMES)
def test_every_architecture_of_a_size_shares_tokenizer_window_and_width(size):
    shape = DENSE_SHAPES[size]
    for spec in ALL:
        cfg = spec.make_config(size)
        assert (cfg.vocab_size, cfg.max_seq_len, cfg.d_model, cfg.n_heads) == (
            shape["vocab_size"], shape["max_seq_len"], shape["d_model"], shape["n_heads"]), spec.name
    hrm = HRM_CODEGEN.make_config(size)
    assert hrm.h_layers == hrm.l_layers == shape["n_layers"] // 2
    for spec in (DENSE_LLAMA, DENSE_GPT2, HMST, GPT2_HSM):
        assert spec.make_config(size).n_layers == shape["n_layers"], spec.name
    widths = (DENSE_LLAMA.make_config(size).d_ff, HMST.make_config(size).expert_d_ff, hrm.d_ff)
    assert widths == (WIDTH_BY_SIZE[size],) * 3
