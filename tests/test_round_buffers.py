"""round_buffers_offload: the round's buffers leave the process while a site trains and come back exact."""

from __future__ import annotations

import os

import pytest
import torch

from scaling_fl.round_buffers import RoundBuffers


def _buffers():
    generator = torch.Generator().manual_seed(0)
    global_weights = torch.randn(1000, generator=generator)
    sums = torch.randn(1000, generator=generator, dtype=torch.float64)
    return global_weights, sums


@pytest.mark.parametrize("offload", ["disk", "cpu"])
def test_buffers_are_empty_inside_and_bitwise_the_same_after(tmp_path, offload):
    global_weights, sums = _buffers()
    before = [global_weights.clone(), sums.clone()]
    alias = global_weights  # a reference the strategy or the exchange holds
    buffers = RoundBuffers(offload, torch.device("cpu"), str(tmp_path / "buffers"))
    with buffers.away([global_weights, sums, None]):
        if offload == "disk":  # a worker on the CPU: the memory is gone while the block runs
            assert global_weights.untyped_storage().nbytes() == 0 and sums.untyped_storage().nbytes() == 0
            assert len(os.listdir(tmp_path / "buffers")) == 2
        else:  # `cpu` from a CPU device is `none`: nothing to gain, nothing moved
            assert global_weights.untyped_storage().nbytes() == 4000
    assert torch.equal(global_weights, before[0]) and torch.equal(sums, before[1])
    assert alias is global_weights and alias.untyped_storage().nbytes() == 4000
    if offload == "disk":
        assert os.listdir(tmp_path / "buffers") == []  # the files go once read back
    global_weights.add_(1.0)  # still an ordinary, writable tensor
    assert torch.equal(global_weights, before[0] + 1.0)


def test_tensors_sharing_a_storage_are_moved_once_and_restored_even_when_the_block_fails(tmp_path):
    global_weights, _ = _buffers()
    before = global_weights.clone()
    buffers = RoundBuffers("disk", torch.device("cpu"), str(tmp_path))
    with pytest.raises(RuntimeError, match="training failed"), buffers.away([global_weights, global_weights]):
        assert len(os.listdir(tmp_path)) == 1
        raise RuntimeError("training failed")
    assert torch.equal(global_weights, before)


def test_none_moves_nothing_and_bad_values_are_refused(tmp_path):
    global_weights, _ = _buffers()
    with RoundBuffers("none", torch.device("cpu")).away([global_weights]):
        assert global_weights.untyped_storage().nbytes() == 4000
    with pytest.raises(ValueError, match="round_buffers_offload must be one of none, cpu, disk"):
        RoundBuffers("gpu", torch.device("cpu"))
    with pytest.raises(ValueError, match="needs a directory"):
        RoundBuffers("disk", torch.device("cpu"))
    with (
        pytest.raises(ValueError, match="whole flat buffers"),
        RoundBuffers("disk", "cpu", str(tmp_path)).away([global_weights[10:]]),
    ):
        pass


def test_a_truncated_buffer_file_is_an_error_not_a_silently_wrong_model(tmp_path):
    global_weights, _ = _buffers()
    with pytest.raises(OSError, match="holds 100 bytes, expected 4000"):
        with RoundBuffers("disk", torch.device("cpu"), str(tmp_path)).away([global_weights]):
            (path,) = tmp_path.iterdir()
            path.write_bytes(path.read_bytes()[:100])  # a disk that failed mid-write
