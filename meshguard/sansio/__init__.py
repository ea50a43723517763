"""The sans-IO protocol core: pure state machines driven by a driver or the simulator.

Nothing here does I/O, reads a clock or draws randomness of its own (DESIGN.md §3).
"""
