"""The metrics stage: ``/metrics`` for Prometheus, ``/healthz`` and ``/readyz``, read from the store."""
