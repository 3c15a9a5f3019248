"""Synthetic CT for training the demonstration model, tests and benchmarks (no patient data needed)."""

from appliance_dev.synthetic.phantom import PHASES, CaseSpec, make_phantom, sample_case, sample_spec

__all__ = ["PHASES", "CaseSpec", "make_phantom", "sample_case", "sample_spec"]
