"""The technician panel: every scan from arrival to PACS, actions on failures, in the clinic's language.

A Flask app (:func:`appliance.panel.app.create_app`) with a blueprint per page family and ``/api/v1``,
served by waitress (:mod:`appliance.panel.server`) from ``appliance serve`` or alone (``appliance panel``).
It reads the store and writes only through the store's own operations.
"""
