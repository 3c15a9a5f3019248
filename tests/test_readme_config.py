"""The README's configuration block ("All keys, with their defaults") is valid TOML and is the defaults."""

from __future__ import annotations

from pathlib import Path

from appliance.config import Config, parse_config
from appliance.validation import loads_toml

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_configuration_block_is_the_embedded_defaults() -> None:
    text = README.read_text(encoding="utf-8")
    start = text.index("```toml\n[dicom]") + len("```toml\n")
    block = text[start:text.index("```", start)]
    # The one value that is not literal: the bundled models' directory depends on the installation.
    block = "\n".join(line for line in block.splitlines() if not line.startswith("models_dir ="))
    documented = parse_config(loads_toml(block)).model_dump()
    defaults = Config().model_dump()
    assert set(documented) == set(defaults)
    for section in defaults:
        assert documented[section] == defaults[section], section
