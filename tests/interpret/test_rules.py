"""The tolerance rule itself must be able to fail: a wrong kernel result is rejected."""
import pytest
import torch

from helpers import assert_close_rule


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_rule_rejects_a_result_off_by_one_percent(dtype):
    ref = torch.randn(1000, dtype=torch.float64)
    eager = ref.to(dtype)
    assert_close_rule("same", eager, eager, ref, dtype)
    wrong = (ref * 1.02).to(dtype)
    with pytest.raises(AssertionError, match="kernel error"):
        assert_close_rule("wrong", wrong, eager, ref, dtype)
