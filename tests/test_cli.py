"""The meshguard command line, run in-process through main() and once as ``python -m``."""

from __future__ import annotations

import base64
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from meshguard import __version__
from meshguard.cli import main
from meshguard.identity.keyfile import load_identity, save_identity
from meshguard.identity.keys import Identity
from meshguard.identity.meshaddr import mesh_ipv4, mesh_ipv6

REPO = Path(__file__).resolve().parent.parent
FRIEND = Identity.from_seed(b"f" * 32)
FRIEND_KEY = base64.b64encode(FRIEND.public_key).decode()
# Identity.from_seed(n.to_bytes(32, "little")) for n = 81 and 418 share a mesh IPv4 address.
COLLIDING_SEEDS = ((81).to_bytes(32, "little"), (418).to_bytes(32, "little"))


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def snapshot(directory: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every path under ``directory`` with its mode, inode and content: any change shows."""
    return {
        str(path.relative_to(directory)): (
            path.lstat().st_mode,
            path.lstat().st_ino,
            path.read_bytes() if path.is_file() and not path.is_symlink() else b"",
        )
        for path in sorted(directory.rglob("*"))
    }


def assert_one_line_error(status: int, out: str, err: str, fragment: str) -> None:
    assert status == 2
    assert out == ""
    assert err.startswith("meshguard: error: ")
    assert err.endswith("\n")
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    assert fragment in err


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "config"
    monkeypatch.setenv("MESHGUARD_CONFIG_DIR", str(directory))
    return directory


@pytest.fixture
def node(config: Path, capsys: pytest.CaptureFixture[str]) -> Identity:
    assert run(capsys, "keygen")[0] == 0
    return load_identity(config / "private.key")


# --- keygen and export -----------------------------------------------------------------------


def test_keygen_creates_a_private_key_file(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run(capsys, "keygen")
    assert (status, err) == (0, "")
    key_file = config / "private.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(config.stat().st_mode) == 0o700
    assert sorted(os.listdir(config)) == ["private.key"]
    identity = load_identity(key_file)
    public_key = base64.b64encode(identity.public_key).decode()
    assert out.splitlines() == [
        f"new identity saved to {key_file}",
        f"public key: {public_key}",
        f"mesh IPv4:  {mesh_ipv4(identity.public_key)}",
        f"mesh IPv6:  {mesh_ipv6(identity.public_key)}",
    ]


def test_keygen_refuses_to_overwrite_without_force(
    config: Path, node: Identity, capsys: pytest.CaptureFixture[str]
) -> None:
    before = snapshot(config)
    assert_one_line_error(*run(capsys, "keygen"), "use --force")
    assert snapshot(config) == before
    status, _, _ = run(capsys, "keygen", "--force")
    assert status == 0
    replaced = load_identity(config / "private.key")
    assert replaced != node
    assert stat.S_IMODE((config / "private.key").stat().st_mode) == 0o600
    assert sorted(os.listdir(config)) == ["private.key"]


def test_export_prints_the_public_keys(node: Identity, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "export")
    assert (status, out) == (0, base64.b64encode(node.public_key).decode() + "\n")
    status, out, _ = run(capsys, "export", "--wg")
    assert (status, out) == (0, base64.b64encode(node.x25519_public).decode() + "\n")


@pytest.mark.parametrize("command", [["export"], ["export", "--wg"], ["ip"]])
def test_commands_needing_a_key_explain_how_to_make_one(
    config: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    assert_one_line_error(*run(capsys, *command), "run 'meshguard keygen'")
    assert not config.exists()


def test_exposed_key_file_is_refused(
    config: Path, node: Identity, capsys: pytest.CaptureFixture[str]
) -> None:
    (config / "private.key").chmod(0o644)
    assert_one_line_error(*run(capsys, "export"), "chmod 600")


# --- ip --------------------------------------------------------------------------------------


def test_ip_of_this_node(node: Identity, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "ip")
    assert status == 0
    assert out.splitlines() == [str(mesh_ipv4(node.public_key)), str(mesh_ipv6(node.public_key))]


def test_ip_of_a_key_a_file_or_a_trusted_name(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = [str(mesh_ipv4(FRIEND.public_key)), str(mesh_ipv6(FRIEND.public_key))]
    assert run(capsys, "ip", FRIEND_KEY)[1].splitlines() == expected
    pub = tmp_path / "friend.pub"
    pub.write_text(FRIEND_KEY + "\n")
    assert run(capsys, "ip", str(pub))[1].splitlines() == expected
    assert run(capsys, "trust", "add", FRIEND_KEY, "--name", "friend")[0] == 0
    assert run(capsys, "ip", "friend")[1].splitlines() == expected


@pytest.mark.parametrize(
    ("argument", "fragment"),
    [
        (
            "no-such-peer",
            "'no-such-peer' is not a public key: not valid base64, and no trusted peer has that",
        ),
        ("QUJD", "decodes to 3 bytes"),
        ("missing.pub", "no such file: missing.pub"),
    ],
)
def test_ip_of_something_unknown_fails_cleanly(
    config: Path, capsys: pytest.CaptureFixture[str], argument: str, fragment: str
) -> None:
    assert_one_line_error(*run(capsys, "ip", argument), fragment)


# --- trust -----------------------------------------------------------------------------------


def test_trust_add_list_remove(
    config: Path, node: Identity, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run(capsys, "trust", "add", FRIEND_KEY, "--name", "friend")
    assert (status, out, err) == (0, f"trusted friend: {FRIEND_KEY}\n", "")
    other = Identity.from_seed(b"o" * 32)
    pub = tmp_path / "other.pub"
    pub.write_text(base64.b64encode(other.public_key).decode() + "\n")
    assert run(capsys, "trust", "add", str(pub), "--name", "other-laptop")[0] == 0
    status, out, err = run(capsys, "trust", "list")
    assert (status, err) == (0, "")
    assert out.splitlines() == [
        f"friend        {FRIEND_KEY}  {mesh_ipv4(FRIEND.public_key)}  "
        f"{mesh_ipv6(FRIEND.public_key)}",
        f"other-laptop  {base64.b64encode(other.public_key).decode()}  "
        f"{mesh_ipv4(other.public_key)}  {mesh_ipv6(other.public_key)}",
    ]
    assert (config / "authorized_keys" / "friend.pub").read_text() == FRIEND_KEY + "\n"
    assert run(capsys, "trust", "remove", "friend") == (0, "removed friend\n", "")
    other_key = base64.b64encode(other.public_key).decode()
    assert run(capsys, "trust", "remove", other_key) == (0, "removed other-laptop\n", "")
    status, out, err = run(capsys, "trust", "list")
    assert (status, out) == (0, "")
    assert "no trusted keys" in err
    assert os.listdir(config / "authorized_keys") == []


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["trust", "add", "not-a-key", "--name", "x"], "not a public key"),
        (["trust", "add", "QUJD", "--name", "x"], "decodes to 3 bytes"),
        (["trust", "add", base64.b64encode(bytes(32)).decode(), "--name", "x"], "not a valid"),
        (["trust", "add", FRIEND_KEY, "--name", "../evil"], "invalid name '../evil'"),
        (["trust", "add", FRIEND_KEY, "--name", ".hidden"], "invalid name"),
        (["trust", "add", FRIEND_KEY, "--name", "friend"], "named 'friend' is already trusted"),
        (["trust", "add", FRIEND_KEY, "--name", "friend2"], "already trusted as 'friend'"),
        (["trust", "add", "/no/such/file.pub", "--name", "x"], "no such file"),
        (["trust", "add", FRIEND_KEY], "required: --name"),
        (["trust", "remove", "nobody"], "no trusted key named 'nobody'"),
        (
            [
                "trust",
                "remove",
                base64.b64encode(Identity.from_seed(bytes(32)).public_key).decode(),
            ],
            "is not trusted",
        ),
        (["trust"], "required: ACTION"),
        (["trust", "frobnicate"], "invalid choice: 'frobnicate'"),
        (["nonsense"], "invalid choice: 'nonsense'"),
        ([], "required: COMMAND"),
    ],
)
def test_user_mistakes_print_one_line_and_change_nothing(
    config: Path,
    node: Identity,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    fragment: str,
) -> None:
    assert run(capsys, "trust", "add", FRIEND_KEY, "--name", "friend")[0] == 0
    before = snapshot(config)
    assert_one_line_error(*run(capsys, *argv), fragment)
    assert snapshot(config) == before


def test_trusting_own_key_is_refused(
    config: Path, node: Identity, capsys: pytest.CaptureFixture[str]
) -> None:
    own = base64.b64encode(node.public_key).decode()
    assert_one_line_error(*run(capsys, "trust", "add", own, "--name", "me"), "own public key")
    assert not (config / "authorized_keys").exists()


def test_trust_add_warns_about_a_mesh_address_collision(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = (Identity.from_seed(seed) for seed in COLLIDING_SEEDS)
    for name, identity in (("first", first), ("second", second)):
        key = base64.b64encode(identity.public_key).decode()
        status, _, err = run(capsys, "trust", "add", key, "--name", name)
        assert status == 0
    address = mesh_ipv4(first.public_key)
    assert err == f"meshguard: warning: second's mesh address {address} is also that of first\n"
    assert len(os.listdir(config / "authorized_keys")) == 2


def test_trust_list_reports_a_corrupt_file_and_lists_the_rest(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, "trust", "add", FRIEND_KEY, "--name", "friend")[0] == 0
    (config / "authorized_keys" / "broken.pub").write_text("garbage!\n")
    status, out, err = run(capsys, "trust", "list")
    assert status == 0
    assert out.startswith(f"friend  {FRIEND_KEY}")
    assert err == (
        f"meshguard: warning: {config / 'authorized_keys'}/broken.pub: not valid base64\n"
    )


# --- config ----------------------------------------------------------------------------------


def test_config_show_before_keygen(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "config", "show")
    assert status == 0
    assert out.splitlines() == [
        f"config dir:      {config}",
        f"private key:     {config / 'private.key'} (missing: run 'meshguard keygen')",
        f"authorized keys: {config / 'authorized_keys'} (0 trusted)",
    ]
    assert not config.exists()


def test_config_show_reports_key_addresses_trust_and_problems(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = (Identity.from_seed(seed) for seed in COLLIDING_SEEDS)
    config.mkdir(mode=0o700)
    save_identity(config / "private.key", first)
    assert run(capsys, "trust", "add", FRIEND_KEY, "--name", "friend")[0] == 0
    second_key = base64.b64encode(second.public_key).decode()
    assert run(capsys, "trust", "add", second_key, "--name", "twin")[0] == 0
    (config / "authorized_keys" / "broken.pub").write_text("QUJD\n")
    status, out, _ = run(capsys, "config", "show")
    assert status == 0
    assert out.splitlines() == [
        f"config dir:      {config}",
        f"private key:     {config / 'private.key'} (present)",
        f"public key:      {base64.b64encode(first.public_key).decode()}",
        f"wireguard key:   {base64.b64encode(first.x25519_public).decode()}",
        f"mesh IPv4:       {mesh_ipv4(first.public_key)}",
        f"mesh IPv6:       {mesh_ipv6(first.public_key)}",
        f"authorized keys: {config / 'authorized_keys'} (2 trusted)",
        "  problem:       broken.pub: decodes to 3 bytes, an Ed25519 public key is 32",
        f"  collision:     {mesh_ipv4(first.public_key)} is claimed by "
        + ", ".join(
            "this node" if key == first.public_key else "twin"
            for key in sorted([first.public_key, second.public_key])
        ),
    ]


def test_config_show_reports_an_unusable_key(
    config: Path, node: Identity, capsys: pytest.CaptureFixture[str]
) -> None:
    (config / "private.key").chmod(0o640)
    status, out, _ = run(capsys, "config", "show")
    assert status == 0
    assert "(unusable: the key file" in out
    assert "chmod 600" in out
    assert "public key:" not in out


def test_config_dir_option_overrides_the_environment(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    elsewhere = tmp_path / "elsewhere"
    assert run(capsys, "--config-dir", str(elsewhere), "keygen")[0] == 0
    assert (elsewhere / "private.key").exists()
    assert not config.exists()
    assert run(capsys, "--config-dir", str(elsewhere), "config", "show")[1].startswith(
        f"config dir:      {elsewhere}\n"
    )


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "--version") == (0, f"meshguard {__version__}\n", "")


# --- directories that cannot be written ------------------------------------------------------


def test_config_dir_below_a_file_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    monkeypatch.setenv("MESHGUARD_CONFIG_DIR", str(blocker / "config"))
    assert_one_line_error(*run(capsys, "keygen"), "cannot create the config directory")
    assert_one_line_error(
        *run(capsys, "trust", "add", FRIEND_KEY, "--name", "friend"), "Not a directory"
    )
    assert os.listdir(tmp_path) == ["blocker"]


NOBODY = 65534


@pytest.mark.root
def test_unwritable_config_dir_as_an_unprivileged_user(capsys: pytest.CaptureFixture[str]) -> None:
    """Root ignores permissions, so the real 'permission denied' case runs as nobody (only the
    effective ids change, so they can be restored)."""
    base = Path(tempfile.mkdtemp(prefix="meshguard-cli-"))
    try:
        base.chmod(0o755)
        config = base / "config"
        config.mkdir(mode=0o755)
        cases = (
            (["keygen"], f"cannot write the key file {config}/private.key: Permission denied"),
            (
                ["trust", "add", FRIEND_KEY, "--name", "friend"],
                f"cannot create {config}/authorized_keys: Permission denied",
            ),
        )
        for argv, fragment in cases:
            os.setegid(NOBODY)
            os.seteuid(NOBODY)
            try:
                outcome = run(capsys, "--config-dir", str(config), *argv)
            finally:
                os.seteuid(0)
                os.setegid(0)
            assert_one_line_error(*outcome, fragment)
        assert os.listdir(config) == []
    finally:
        shutil.rmtree(base)


# --- as a program ----------------------------------------------------------------------------


def test_python_dash_m_meshguard(tmp_path: Path) -> None:
    environment = dict(os.environ, MESHGUARD_CONFIG_DIR=str(tmp_path / "config"))
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO), environment.get("PYTHONPATH")])
    )

    def meshguard(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "meshguard", *argv],
            env=environment,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )

    generated = meshguard("keygen")
    assert generated.returncode == 0, generated.stderr
    exported = meshguard("export")
    assert exported.returncode == 0
    identity = load_identity(tmp_path / "config" / "private.key")
    assert exported.stdout == base64.b64encode(identity.public_key).decode() + "\n"
    refused = meshguard("keygen")
    assert_one_line_error(refused.returncode, refused.stdout, refused.stderr, "--force")
    assert load_identity(tmp_path / "config" / "private.key") == identity
