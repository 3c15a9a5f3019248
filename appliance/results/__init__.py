"""The results stage: one model's output on one series as standard DICOM (SEG, TID 1500 SR, key-image SC)
plus PNG previews and an ``objects.json`` listing for export and the panel."""

from appliance.results.build import ResultObject, build_results

__all__ = ["ResultObject", "build_results"]
