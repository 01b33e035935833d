"""The keyring (blocktarget.keyring) and its methods on an in-process Target: file
checks (absolute, regular, ours, 0600, no symlink, small ASCII), names, the save_config
section order, nvmf_set_config, and that no output carries key material. Budget: < 1 s.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from blocktarget.app import Target
from blocktarget.config import Settings
from blocktarget.errors import AlreadyExists, Busy, InvalidParams, NoSuchDevice, NotPermitted
from blocktarget.keyring import Keyring, read_key_file
from blocktarget.nvme.auth import DhchapKey
from blocktarget.rpc import call_method

NQN = "nqn.2026-01.io.blocktarget:k"
HOST = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555"


def _key(tmp_path: Path, name: str, mode: int = 0o600, text: str | None = None) -> str:
    p = tmp_path / name
    p.write_text(text if text is not None else DhchapKey.generate(1).encode() + "\n")
    os.chmod(p, mode)
    return str(p)


def test_read_key_file_checks(tmp_path: Path) -> None:
    good = _key(tmp_path, "good")
    assert read_key_file(good).startswith("DHHC-1:01:")
    with pytest.raises(NotPermitted, match="0644"):
        read_key_file(_key(tmp_path, "world", 0o644))
    with pytest.raises(NotPermitted, match="0604"):
        read_key_file(_key(tmp_path, "other", 0o604))
    read_key_file(_key(tmp_path, "owner_ro", 0o400))  # stricter is fine
    with pytest.raises(InvalidParams, match="absolute"):
        read_key_file("good")
    with pytest.raises(NoSuchDevice):
        read_key_file(str(tmp_path / "nope"))
    link = tmp_path / "link"
    link.symlink_to(good)
    with pytest.raises(InvalidParams, match="cannot open"):
        read_key_file(str(link))  # a link could point anywhere: refused
    with pytest.raises(InvalidParams, match="regular"):
        read_key_file(str(tmp_path))
    with pytest.raises(InvalidParams, match="empty"):
        read_key_file(_key(tmp_path, "empty", text="\n"))
    with pytest.raises(InvalidParams, match="larger"):
        read_key_file(_key(tmp_path, "big", text="x" * 5000))
    with pytest.raises(InvalidParams, match="ASCII"):
        read_key_file(_key(tmp_path, "bin", text="\u00e9t\u00e9"))


def test_keyring_names_and_repr(tmp_path: Path) -> None:
    kr = Keyring()
    k = kr.add_file_key("k0", _key(tmp_path, "k0"))
    assert kr.get("k0") is k and len(kr) == 1
    assert k.material not in repr(k) and "k0" in repr(k)
    with pytest.raises(AlreadyExists):
        kr.add_file_key("k0", _key(tmp_path, "k0b"))
    for bad in ("", "a/b", "tab\there"):
        with pytest.raises(InvalidParams):
            kr.add_file_key(bad, _key(tmp_path, "x"))
    kr.remove("k0")
    with pytest.raises(NoSuchDevice):
        kr.get("k0")


async def test_methods_and_save_config(tmp_path: Path) -> None:
    t = Target(Settings(cores=[0]), dry_run=True)
    k1, c1 = _key(tmp_path, "k1"), _key(tmp_path, "c1")
    await call_method(t, "keyring_file_add_key", {"name": "k1", "path": k1})
    await call_method(t, "keyring_file_add_key", {"name": "c1", "path": c1})
    await call_method(t, "nvmf_create_subsystem", {"nqn": NQN})
    await call_method(t, "nvmf_subsystem_add_host", {"nqn": NQN, "host": HOST,
                                                     "dhchap_key": "k1", "dhchap_ctrlr_key": "c1"})
    await call_method(t, "nvmf_set_config", {"dhchap_digests": ["sha256"]})
    with pytest.raises(Busy):
        await call_method(t, "keyring_file_remove_key", {"name": "c1"})
    keys = await call_method(t, "keyring_get_keys", {})
    assert {k["name"]: k["refcnt"] for k in keys} == {"k1": 2, "c1": 2}
    cfg = t.save_config()
    assert [s["subsystem"] for s in cfg["subsystems"]] == ["keyring", "bdev", "nvmf"]
    nvmf = cfg["subsystems"][2]["config"]
    assert nvmf[0]["method"] == "nvmf_set_config"
    assert nvmf[0]["params"]["dhchap_digests"] == ["sha256"]
    text = json.dumps(cfg)
    for p in (k1, c1):
        secret = Path(p).read_text().split(":")[2]
        assert secret not in text and secret[:12] not in text
    # clear the controller key, then it may go
    await call_method(t, "nvmf_subsystem_set_keys", {"nqn": NQN, "host": HOST,
                                                     "dhchap_key": "k1"})
    await call_method(t, "keyring_file_remove_key", {"name": "c1"})
    assert t.subsystems.get(NQN).hosts[HOST] == {"dhchap_key": "k1"}
    # an empty keyring and default options leave save_config as before
    await call_method(t, "nvmf_subsystem_set_keys", {"nqn": NQN, "host": HOST})
    await call_method(t, "keyring_file_remove_key", {"name": "k1"})
    await call_method(t, "nvmf_set_config", {"dhchap_digests": ["sha256", "sha384", "sha512"]})
    cfg = t.save_config()
    assert [s["subsystem"] for s in cfg["subsystems"]] == ["bdev", "nvmf"]
    assert all(c["method"] != "nvmf_set_config" for c in cfg["subsystems"][1]["config"])
