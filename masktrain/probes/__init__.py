"""Shape-leakage probes, registered by name in :data:`PROBES` (a :class:`masktrain.registry.Registry`).

Each probe evaluates per masking method (or per mask kind, for ``mask_only``) in two
steps: ``collect`` runs the model on this rank's shard and returns per-sample records;
``summarise`` turns the records of all ranks into a report entry (see docs/probes.md).
A probe is one file: see :mod:`masktrain.probes.base` and docs/probes.md, "Writing a probe".
"""
from masktrain.probes.base import PROBES, Probe, ProbeContext, get_probe, register_probe

# Importing the modules registers the probes.
from masktrain.probes import object_removal, shape_only, linear_probe, mask_only, missingness_curve  # noqa: E402,F401
from masktrain.probes import attribution  # noqa: E402,F401
from masktrain.probes import backgrounds  # noqa: E402,F401

__all__ = ["PROBES", "Probe", "ProbeContext", "get_probe", "register_probe"]
