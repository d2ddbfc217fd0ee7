"""bench/fp8_loss.py's override merge: the base overrides, then the arm's, then the command line's; a key given
again replaces the earlier value, so every key reaches hydra once and the last value wins."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bench"))
import fp8_loss  # noqa: E402


def _as_dict(overrides):
    keys = [o.split("=", 1)[0] for o in overrides]
    assert len(keys) == len(set(keys)), overrides  # every key once
    return dict(o.split("=", 1) for o in overrides)


def test_later_overrides_replace_earlier_ones():
    base = _as_dict(fp8_loss.base_overrides(300))
    assert base["train.lr"] == "1e-3" and base["train.micro_batch_size"] == "8"
    got = _as_dict(fp8_loss.merged_overrides(300, ["train.lr=3e-4"], fp8_loss.ARMS["bf16_mb4"]))
    assert got == {**base, "model.dtype": "bfloat16", "fp8": "off", "train.micro_batch_size": "4",
                   "train.lr": "3e-4"}
    # the command line wins over the arm too
    got = _as_dict(fp8_loss.merged_overrides(300, ["fp8=blockwise"], fp8_loss.ARMS["bf16"]))
    assert got["fp8"] == "blockwise" and got["train.steps"] == "300"
