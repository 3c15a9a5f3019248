"""What the demonstration model is: the package's name and version, the input specification serving
resamples to (the manifest's ``[input]`` and ``[normalisation]``), the network's widths and the seed ranges.
"""

from __future__ import annotations

from appliance.infer.preprocess import InputSpec

NAME = "liver-ct-demo"
VERSION = "1.5.1"
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
FINDING_SCORE: dict | None = None
N_CLASSES = 3
SPEC = InputSpec(channels=3, spacing_mm=(2.0, 2.0), size_multiple=16, min_size=(64, 64),
                 max_size=(256, 256), window=(-250.0, 350.0))
OPT_SIZE = (192, 192)
OPT_BATCH, MAX_BATCH = 8, 16
WIDTHS = (12, 24, 48, 96, 192)  # --width 12 (the default), doubling per level
HELDOUT_SEED0 = 1_000_000
