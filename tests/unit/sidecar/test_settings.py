"""Token files: read, and warned of when others may read them."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.settings import TokenError, loose_token_file, read_token

pytestmark = pytest.mark.timeout(10)

TOKEN = "0123456789abcdef0123456789abcdef\n"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_token_file_others_may_read_is_warned_of(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "token"
    path.write_text(TOKEN)
    path.chmod(mode)
    warning = loose_token_file(path)
    assert warning is not None and f"mode {mode:o}" in warning and "chmod 600" in warning


def test_owner_only_and_kubernetes_secret_volumes_are_not(tmp_path: Path) -> None:
    own = tmp_path / "own"
    own.write_text(TOKEN)
    own.chmod(0o600)
    assert loose_token_file(own) is None
    # A Secret volume as the kubelet writes it: files behind a ..data symlink, 0644.
    volume = tmp_path / "secret"
    (volume / "..2026_12_02").mkdir(parents=True)
    (volume / "..2026_12_02" / "token").write_text(TOKEN)
    (volume / "..data").symlink_to("..2026_12_02")
    (volume / "token").symlink_to("..data/token")
    (volume / "..2026_12_02" / "token").chmod(0o644)
    assert loose_token_file(volume / "token") is None
    assert read_token(volume / "token") == TOKEN.strip()
    assert loose_token_file(tmp_path / "missing") is None


def test_a_short_token_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("short")
    with pytest.raises(TokenError, match="shorter than 16"):
        read_token(path)
