"""What a checkpoint costs in I/O: hashes come from the bytes written, commit reads nothing
model-sized back, prune does not download the checkpoints it keeps, and verify (on load) still
reads and checks everything. In-process; one test runs against the S3 server (moto)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pytest
import torch

from scaling_fl import checkpoint, storage


@pytest.fixture(autouse=True)
def fresh_trust():
    """Each test starts as a fresh process would: no checkpoint committed or verified yet."""
    checkpoint._trusted.clear()
    yield
    checkpoint._trusted.clear()


@pytest.fixture
def reads(monkeypatch) -> list[tuple[str, int]]:
    """Every storage read the checkpoint code makes: (file name, bytes)."""
    seen: list[tuple[str, int]] = []
    real = storage.read_bytes

    def counting(path):
        data = real(path)
        seen.append((os.fspath(path).rsplit("/", 1)[-1], len(data)))
        return data

    monkeypatch.setattr(storage, "read_bytes", counting)
    return seen


def _write_round(ck: str, number: int, numel: int = 4096) -> dict[str, bytes]:
    """A round as the leader writes it; returns what each file holds right after writing."""
    directory = checkpoint.round_dir(ck, number)
    checkpoint.write_tensors(directory, "global.safetensors", {"global": torch.full((numel,), float(number))})
    checkpoint.write_tensors(directory, checkpoint.site_file(1), {"residual": torch.ones(numel)})
    checkpoint.write_state(directory, {"round": number, "history": []})
    return {
        name: storage.read_bytes(f"{directory}/{name}")
        for name in ("global.safetensors", checkpoint.site_file(1), "state.json")
    }


def _data_reads(reads: list[tuple[str, int]]) -> list[str]:
    """Reads of checkpoint files proper (the writers' small records excluded)."""
    return [name for name, _ in reads if not name.startswith(".")]


def _marker(directory: Path) -> dict:
    return json.loads((directory / checkpoint.MARKER).read_bytes())["files"]


def _entry(data: bytes) -> dict:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_commit_takes_the_hashes_from_the_writers_and_reads_no_file_back(tmp_path, reads):
    ck = str(tmp_path / "ck")
    written = _write_round(ck, 1)
    reads.clear()
    checkpoint.commit(checkpoint.round_dir(ck, 1))
    assert _data_reads(reads) == []
    assert sum(size for _, size in reads) < 1024 * len(written)  # the records only: a few hundred bytes each
    assert _marker(tmp_path / "ck" / "round-000001") == {name: _entry(data) for name, data in written.items()}
    assert checkpoint.verify(checkpoint.round_dir(ck, 1)).round == 1


def test_the_records_are_hidden_and_gone_once_sealed(tmp_path):
    ck = tmp_path / "ck"
    _write_round(str(ck), 1)
    folder = ck / "round-000001"
    assert sorted(path.name for path in folder.iterdir() if path.name.startswith(".")) == sorted(
        [".global.safetensors.sha256.json", ".site-00001.safetensors.sha256.json", ".state.json.sha256.json"]
    )
    checkpoint.commit(str(folder))
    assert sorted(path.name for path in folder.iterdir()) == [
        "COMMITTED",
        "global.safetensors",
        "site-00001.safetensors",
        "state.json",
    ]
    assert sorted(_marker(folder)) == ["global.safetensors", "site-00001.safetensors", "state.json"]


def test_a_second_commit_hashes_what_the_folder_holds(tmp_path, reads):
    """Without records (the first commit took them), sealing again reads and hashes every file, as
    commit always did: a folder rewritten by other means is sealed as it is."""
    ck = tmp_path / "ck"
    _write_round(str(ck), 1)
    folder = ck / "round-000001"
    checkpoint.commit(str(folder))
    (folder / "state.json").write_bytes(json.dumps({"round": 1, "history": [{"round": 1, "metrics": {}}]}).encode())
    reads.clear()
    checkpoint.commit(str(folder))
    assert sorted(_data_reads(reads)) == ["global.safetensors", "site-00001.safetensors", "state.json"]
    assert checkpoint.verify(str(folder)).state["history"] == [{"round": 1, "metrics": {}}]


def test_a_file_replaced_after_it_was_written_is_sealed_as_it_is_now(tmp_path, reads, caplog):
    """Commit seals the folder's content: a file whose record no longer describes it (replaced by
    other means) is read and hashed, with a warning; then verify checks that content as usual."""
    ck = tmp_path / "ck"
    _write_round(str(ck), 2)
    state = ck / "round-000002" / "state.json"
    state.write_bytes(json.dumps({"round": 3}).encode())  # sealable bytes, wrong content
    reads.clear()
    with caplog.at_level(logging.WARNING, logger="scaling_fl"):
        checkpoint.commit(str(ck / "round-000002"))
    assert _data_reads(reads) == ["state.json"]
    assert f"{ck}/round-000002/state.json changed after it was written" in caplog.text
    assert _marker(ck / "round-000002")["state.json"] == _entry(state.read_bytes())
    with pytest.raises(checkpoint.CheckpointError, match="says round 3, its folder is round 2"):
        checkpoint.verify(str(ck / "round-000002"))  # the shape check, not a hash mismatch


def test_prune_does_not_read_the_checkpoints_it_keeps(tmp_path, reads):
    ck = str(tmp_path / "ck")
    for number in range(1, 6):
        _write_round(ck, number)
        checkpoint.commit(checkpoint.round_dir(ck, number))
        reads.clear()
        removed = checkpoint.prune(ck, keep_last=2)
        assert reads == []  # neither files nor markers: a listing shows them unchanged
        assert removed == ([checkpoint.round_dir(ck, number - 2)] if number > 2 else [])
    assert checkpoint.list_rounds(ck) == [4, 5]


def test_prune_after_a_restart_verifies_each_kept_checkpoint_once(tmp_path, reads):
    ck = str(tmp_path / "ck")
    for number in (1, 2, 3):
        _write_round(ck, number)
        checkpoint.commit(checkpoint.round_dir(ck, number))
    checkpoint._trusted.clear()  # a new process: nothing committed or verified by it yet
    reads.clear()
    assert checkpoint.prune(ck, keep_last=2) == [checkpoint.round_dir(ck, 1)]
    assert sorted(set(_data_reads(reads))) == [
        "COMMITTED",
        "global.safetensors",
        "site-00001.safetensors",
        "state.json",
    ]
    reads.clear()
    assert checkpoint.prune(ck, keep_last=2) == []
    assert reads == []


def test_prune_reverifies_a_kept_checkpoint_changed_since_and_keeps_the_newest_good_one(tmp_path, reads):
    ck = tmp_path / "ck"
    for number in (1, 2, 3):
        _write_round(str(ck), number)
        checkpoint.commit(str(ck / f"round-{number:06d}"))
    newest = ck / "round-000003" / "global.safetensors"
    newest.write_bytes(newest.read_bytes()[:-4])  # truncated after commit
    reads.clear()
    removed = checkpoint.prune(str(ck), keep_last=1)
    assert "global.safetensors" in _data_reads(reads)  # it was read again, found broken...
    assert removed == [str(ck / "round-000001")]  # ...so round 2 is the newest good one and stays
    assert checkpoint.list_rounds(str(ck)) == [2, 3]
    assert checkpoint.latest(str(ck)).round == 2


def test_a_replaced_marker_is_not_trusted(tmp_path):
    ck = tmp_path / "ck"
    for number in (1, 2):
        _write_round(str(ck), number)
        checkpoint.commit(str(ck / f"round-{number:06d}"))
    marker = ck / "round-000002" / checkpoint.MARKER
    files = json.loads(marker.read_bytes())
    files["files"]["state.json"]["sha256"] = "0" * 64
    marker.write_bytes(json.dumps(files).encode())
    assert checkpoint.prune(str(ck), keep_last=1) == []  # round 2 broken: round 1 is the newest good one
    assert checkpoint.latest(str(ck)).round == 1


def test_verify_on_load_still_rejects_a_tampered_file_even_one_this_process_committed(tmp_path, reads):
    ck = tmp_path / "ck"
    for number in (1, 2):
        _write_round(str(ck), number)
        checkpoint.commit(str(ck / f"round-{number:06d}"))
    path = ck / "round-000002" / "global.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, one bit pattern changed in the weights
    path.write_bytes(bytes(data))
    reads.clear()
    with pytest.raises(checkpoint.CheckpointError, match="does not match its marker"):
        checkpoint.verify(str(ck / "round-000002"))
    assert "global.safetensors" in _data_reads(reads)
    assert checkpoint.latest(str(ck)).round == 1


def test_on_s3_a_round_uploads_the_model_once_and_downloads_nothing_model_sized(s3_env, reads):
    ck = f"s3://{s3_env.bucket}/checkpoint-io-{os.getpid()}/ck"
    numel = 256 * 1024  # 1 MiB of weights per file
    for number in range(1, 5):
        _write_round(ck, number, numel=numel)
        reads.clear()
        checkpoint.commit(checkpoint.round_dir(ck, number))
        checkpoint.prune(ck, keep_last=2)
        assert _data_reads(reads) == []
        assert sum(size for _, size in reads) < 4096
    assert checkpoint.list_rounds(ck) == [3, 4]
    checkpoint._trusted.clear()
    found = checkpoint.latest(ck)  # on load: everything read and checked
    assert found.round == 4 and found.tensors("global.safetensors")["global"][0].item() == 4.0
    bucket_client = s3_env.client()
    key = f"checkpoint-io-{os.getpid()}/ck/round-000004/global.safetensors"
    body = bucket_client.get_object(Bucket=s3_env.bucket, Key=key)["Body"].read()
    bucket_client.put_object(Bucket=s3_env.bucket, Key=key, Body=body[:-1] + bytes([body[-1] ^ 1]))
    assert checkpoint.latest(ck).round == 3  # tampered (same size): skipped on load
    storage.remove_tree(ck.rsplit("/", 1)[0])
