"""write_atomic: bytes, text or a writer callable land whole, and a failure leaves nothing behind."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tuner.atomic import save_atomic, write_atomic


def test_bytes_text_and_a_writer_land_whole(tmp_path: Path) -> None:
    write_atomic(tmp_path / "a", b"\x00\x01")
    write_atomic(tmp_path / "b", "é")
    write_atomic(tmp_path / "c", lambda f: f.write(b"xyz"))
    assert [(tmp_path / n).read_bytes() for n in "abc"] == [b"\x00\x01", "é".encode(), b"xyz"]
    save_atomic({"w": torch.arange(5.0)}, tmp_path / "ck.pt")
    assert torch.equal(torch.load(tmp_path / "ck.pt", weights_only=True)["w"], torch.arange(5.0))


def test_a_writer_failing_midway_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "ck.pt"
    save_atomic({"epoch": 1}, target)

    def torn(f) -> None:
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomic(target, torn)
    assert torch.load(target, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]
