"""The bundled reference MoE: a small, readable decoder-only transformer with MoE layers, its data and the demo.

- ``moewatch.reference.model``: ``MoEConfig``, ``MoEGPT``, the ``Router`` (moewatch's router protocol) and the
  balancing methods (aux loss, z-loss, aux-loss-free bias, router noise, capacity factor);
- ``moewatch.reference.data``: a byte corpus built from the Python standard library (no downloads);
- ``moewatch.reference.demo``: the demo scenarios and ``run_demo``.

See docs/reference.md.
"""

from moewatch.reference.model import MoEConfig, MoEGPT, MoEOutput, Router, RouterOutput

__all__ = ["MoEConfig", "MoEGPT", "MoEOutput", "Router", "RouterOutput"]
