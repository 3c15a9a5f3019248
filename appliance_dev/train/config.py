"""What the demonstration model is: the package's name and version, the input specification serving
resamples to (the manifest's ``[input]`` and ``[normalisation]``), the network's widths and the seed ranges.
"""

from __future__ import annotations

from appliance.infer.preprocess import InputSpec

NAME = "liver-ct-demo"
VERSION = "1.6.0"
#: The package's confidence threshold, chosen on validation phantoms after training (the highest that costs no
#: sensitivity for lesions of 10 mm or more: ``scripts/eval_demo_model.py --split validation --variety 2``).
MIN_CONFIDENCE = 0.24
#: The rim rule (``[reporting] max_edge_contact``, ``rim_max_width_mm``): a finding narrower than 6 mm (a round
#: lesion under about 14 mm) with more than this fraction of its border on the liver's edge is not reported.
#: The limit is the lowest that drops no true finding on the validation phantoms (the same command).
MAX_EDGE_CONTACT = 0.35
RIM_MAX_WIDTH_MM = 6.0
#: The finding score (``[reporting.finding_score]``): fitted on the fit phantoms and its limit chosen on the
#: validation phantoms by ``scripts/fit_finding_score.py`` (see the model card); None: the package has none.
#: 1.6.0's: fitted on 600 fit phantoms (variety 3 seeds 4,000,000.., variety 2 seeds 4,100,000..), min_score
#: chosen on 100 validation phantoms (variety 2) as the lowest keeping false findings >= 10 mm at 0.2 per case.
FINDING_SCORE: dict | None = {
    "features": ["log_diameter", "elongation", "fill", "roundness", "confidence", "peak_confidence", "contrast", "abs_contrast", "edge_contact"],
    "mean": [2.673088, 0.742369, 0.94816, 0.627722, 0.736294, 0.987965, -0.231286, 0.351035, 0.083371],
    "scale": [0.714824, 0.153888, 0.244895, 0.147828, 0.141663, 0.039853, 0.327626, 0.193924, 0.140028],
    "weights": [0.895518, 0.397279, -0.365164, 0.5521, 0.079216, -0.056212, -0.575005, 0.230875, -0.90758],
    "bias": -1.20357,
    "min_score": 0.14,
}
N_CLASSES = 3
SPEC = InputSpec(channels=3, spacing_mm=(2.0, 2.0), size_multiple=16, min_size=(64, 64),
                 max_size=(256, 256), window=(-250.0, 350.0))
OPT_SIZE = (192, 192)
OPT_BATCH, MAX_BATCH = 8, 16
WIDTHS = (12, 24, 48, 96, 192)  # --width 12 (the default), doubling per level
HELDOUT_SEED0 = 1_000_000
