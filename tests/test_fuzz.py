"""Fuzzing the patch and checkpoint readers (erasekit.testing.fuzz, with hypothesis): a few hundred cases here;
`python -m erasekit.testing fuzz --n 10000` runs a long campaign."""

from __future__ import annotations

import os
from pathlib import Path

from erasekit.errors import PatchFormatError
from erasekit.testing.fuzz import Findings, campaign, check


def test_every_broken_file_is_refused_cleanly_unchanged_and_in_bounded_memory() -> None:
    found = campaign(int(os.environ.get("ERASEKIT_FUZZ_CASES", "400")), seed=0)
    assert found.cases >= 300
    assert found.failures == []
    assert found.refused.get("PatchFormatError", 0) > 50 and found.refused.get("LayoutError", 0) > 50
    assert found.labels["patch/claims"] >= 10  # manifests claiming layers up to 70,000 wide, factors that wide


def test_the_harness_notices_each_way_a_reader_can_break() -> None:
    def crashes(path: Path) -> None:
        raise KeyError("data_offsets")

    def writes(path: Path) -> None:
        path.write_bytes(b"changed")
        raise PatchFormatError("refused", "fix")

    def hoards(path: Path) -> None:
        blob = bytearray(64 * 2**20)  # trusts a size from the file
        del blob

    found = Findings()
    for reader in (crashes, writes, hoards):
        check(b"\x00" * 16, reader, found, reader.__name__)
    assert [f.split(":")[0] for f in found.failures] == ["crashes", "writes", "hoards"]
    assert "KeyError" in found.failures[0] and "changed the file" in found.failures[1] and "MiB" in found.failures[2]
