"""meshguard: a decentralized mesh VPN built on SWIM gossip and WireGuard tunnels."""

__version__ = "0.1.0"
