"""A node's identity: its Ed25519 key, the X25519 key derived from it, trust and mesh addresses.

- ``keys``: the Ed25519 identity, the derived X25519 key, signatures, public-key validation (pure).
- ``meshaddr``: mesh IPv4/IPv6 addresses derived from a public key, collision report (pure).
- ``keyfile``: the private key file, written atomically with mode 0600.
- ``trust``: the ``authorized_keys/`` directory of trusted peers.

Nothing is re-exported here so that the sans-IO core can import the pure modules without
pulling in the file-handling ones.
"""
