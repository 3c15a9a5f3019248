"""One blueprint per page family, and the JSON API; all read through :mod:`appliance.panel.queries`."""
