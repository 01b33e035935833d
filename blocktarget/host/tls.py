"""The initiator's TLS PSK: from the interchange-format key to what each queue offers.

Every queue of a controller offers the same identity (host NQN, subsystem NQN) and the
TLS PSK derived for it (nvme/tls_keys.py), like the Linux host does with the key
`nvme gen-tls-key` made and the target holds in its keyring.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..nvme.tls_keys import ConfiguredPsk, identity_for, tls_psk


@dataclass(frozen=True, repr=False)
class HostPsk:
    psk: ConfiguredPsk
    identity_version: int = 0  # 1: the identity carries the PSK digest

    def __repr__(self) -> str:
        return f"HostPsk({self.psk!r}, identity v{self.identity_version})"

    @classmethod
    def load(cls, key: str, identity_version: int = 0) -> HostPsk:
        """``key`` is the interchange text itself or the path of a file holding it."""
        text = key
        if not key.startswith("NVMeTLSkey-1:") and os.path.exists(key):
            with open(key) as f:
                text = f.read()
        if identity_version not in (0, 1):
            raise ValueError("PSK identity version must be 0 or 1")
        return cls(ConfiguredPsk.parse(text), identity_version)

    def for_queue(self, hostnqn: str, subnqn: str) -> tuple[bytes, bytes, int]:
        """(PSK identity, TLS PSK, hash id) for QueuePair.open(tls=...)."""
        ident = identity_for(self.psk, hostnqn, subnqn, self.identity_version)
        return str(ident).encode(), tls_psk(self.psk, ident), ident.hash_id
