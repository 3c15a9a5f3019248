"""Edge inference appliance for clinics.

The package is split into pipeline stages (``ingest``, ``assemble``, later ``route``, ``infer``,
``results``, ``export``) that talk only through the durable ``store``.
"""

__version__ = "0.1.0"

#: Shown in DICOM (ImplementationVersionName is limited to 16 characters) and in logs.
IMPLEMENTATION_VERSION_NAME = f"EDGEAPPL_{__version__}"[:16]
