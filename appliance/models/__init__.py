"""Model packages: what a vendor drops into ``models/<name>/`` and how the appliance checks it."""

from appliance.models.package import (
    ModelPackage,
    bundled_models_dir,
    find_packages,
    installed_package,
    load_package,
)

__all__ = ["ModelPackage", "bundled_models_dir", "find_packages", "installed_package", "load_package"]
