"""meshguard's discrete-event simulator: the real sans-IO cores on a simulated network.

The Python API is what ``python -m sim`` and the notebooks use::

    import sim
    scenario = sim.load_scenario("scenarios/smoke-5.yaml")
    result = sim.run(scenario, seed=7, out_dir="results/smoke-5")
    result.summary["converged_at"], result.trace_hash
"""

from sim.cores import Core, CoreFactory, HostContext, NodeCore, membership_core, node_core
from sim.nat import NAT_TYPES, Nat, NatBehaviour
from sim.network import Middlebox, Network, Packet
from sim.runner import EXPECTED_FIRST_DETECTION_PERIODS, Result, Simulation, run
from sim.scenario import Scenario, ScenarioError, load_scenario

__all__ = [
    "EXPECTED_FIRST_DETECTION_PERIODS",
    "NAT_TYPES",
    "Core",
    "CoreFactory",
    "HostContext",
    "Middlebox",
    "Nat",
    "NatBehaviour",
    "Network",
    "NodeCore",
    "Packet",
    "Result",
    "Scenario",
    "ScenarioError",
    "Simulation",
    "load_scenario",
    "membership_core",
    "node_core",
    "run",
]
