"""Drivers that run the sans-IO core on a real Linux host: TUN, UDP, netlink, event loop."""
