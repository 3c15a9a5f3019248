"""Configuration: validated in full, with messages that name the bad key."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.config import Config, load_config, parse_config
from appliance.errors import ConfigError


def load_text(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "appliance.toml"
    path.write_text(text)
    return load_config(path)


def test_unknown_key_is_refused_and_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_text(tmp_path, "[dicom]\nprot = 1\n")
    msg = str(err.value)
    assert "dicom.prot" in msg
    assert "unknown key" in msg
    assert str(tmp_path / "appliance.toml") in msg


def test_unknown_section_is_refused_and_named() -> None:
    with pytest.raises(ConfigError, match=r"storgae"):
        parse_config({"storgae": {"data_dir": "/x"}})


def test_unknown_key_in_allowed_caller_is_named() -> None:
    with pytest.raises(ConfigError, match=r"dicom\.allowed_callers\.0\.hots"):
        parse_config({"dicom": {"allowed_callers": [{"ae_title": "CT01", "hots": "10.0.0.1"}]}})


@pytest.mark.parametrize("port", [0, -1, 65536, 100000])
def test_bad_port_is_named(port: int) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"dicom": {"port": port}})
    assert "dicom.port" in str(err.value)
    assert repr(port) in str(err.value)


def test_port_of_wrong_type_is_named() -> None:
    with pytest.raises(ConfigError, match=r"dicom\.port"):
        parse_config({"dicom": {"port": "eleven"}})


@pytest.mark.parametrize("title", ["", "   ", "A" * 17, "BACK\\SLASH", "ÄRZTE", "TAB\tAE"])
def test_bad_ae_title_is_named(title: str) -> None:
    with pytest.raises(ConfigError, match=r"dicom\.ae_title"):
        parse_config({"dicom": {"ae_title": title}})


def test_bad_allowed_caller_ae_title_is_named() -> None:
    with pytest.raises(ConfigError, match=r"dicom\.allowed_callers\.1\.ae_title"):
        parse_config({"dicom": {"allowed_callers": [{"ae_title": "CT01"}, {"ae_title": "X" * 20}]}})


def test_every_bad_key_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"dicom": {"port": 0, "ae_title": ""}, "storage": {"min_free_bytes": -1}})
    msg = str(err.value)
    for key in ("dicom.port", "dicom.ae_title", "storage.min_free_bytes"):
        assert key in msg


@pytest.mark.parametrize("section,key,value", [
    ("assemble", "stable_seconds", 0),
    ("assemble", "release_grace_seconds", -1),
    ("assemble", "poll_seconds", 10),
    ("dicom", "max_associations", 0),
    ("dicom", "network_timeout", 0),
    ("logging", "level", "LOUD"),
])
def test_out_of_range_values_are_named(section: str, key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"{section}\.{key}"):
        parse_config({section: {key: value}})


def test_defaults_when_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no appliance.toml here
    monkeypatch.delenv("APPLIANCE_CONFIG", raising=False)
    cfg = load_config(None)
    assert cfg.source is None
    assert cfg.dicom.ae_title == "EDGE"
    assert cfg.dicom.port == 11112
    assert cfg.dicom.allowed_callers == []
    assert cfg.storage.data_dir == Path("./var")
    assert cfg.storage.min_free_bytes > 0
    assert cfg.assemble.stable_seconds > cfg.assemble.release_grace_seconds >= 0
    assert cfg.logging.level == "INFO"
    assert cfg == Config()


def test_default_file_in_working_directory_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "appliance.toml").write_text('[dicom]\nport = 4242\nae_title = "EDGE2"\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("APPLIANCE_CONFIG", raising=False)
    cfg = load_config(None)
    assert cfg.dicom.port == 4242
    assert cfg.dicom.ae_title == "EDGE2"
    assert cfg.source == Path("appliance.toml")


def test_the_environment_names_the_file_when_no_path_is_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An installed box sets APPLIANCE_CONFIG once: commands run by hand then read the service's file, ahead of
    a stray ./appliance.toml; an explicit path still wins, and a missing file is named with where it came from."""
    (tmp_path / "appliance.toml").write_text("[dicom]\nport = 4242\n")
    box = tmp_path / "etc.toml"
    box.write_text("[dicom]\nport = 5151\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("APPLIANCE_CONFIG", str(box))
    assert load_config(None).dicom.port == 5151 and load_config(None).source == box
    assert load_config(tmp_path / "appliance.toml").dicom.port == 4242
    monkeypatch.setenv("APPLIANCE_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match=r"missing\.toml \(from \$APPLIANCE_CONFIG\)"):
        load_config(None)
    monkeypatch.setenv("APPLIANCE_CONFIG", "")  # set but empty: as if unset
    assert load_config(None).dicom.port == 4242


def test_valid_file_with_allowed_callers(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, """
[dicom]
ae_title = "EDGE"
port = 104
allowed_callers = [{ ae_title = "CT01", host = "10.9.9.9" }, { ae_title = "MR01" }]

[storage]
data_dir = "/var/lib/appliance"
min_free_bytes = 0
""")
    assert cfg.dicom.port == 104
    assert [(c.ae_title, c.host) for c in cfg.dicom.allowed_callers] == [("CT01", "10.9.9.9"), ("MR01", None)]
    assert cfg.storage.data_dir == Path("/var/lib/appliance")
    assert cfg.storage.min_free_bytes == 0


def test_ae_title_surrounding_spaces_are_stripped() -> None:
    assert parse_config({"dicom": {"ae_title": " EDGE "}}).dicom.ae_title == "EDGE"


def test_invalid_toml_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_text(tmp_path, "[dicom\nport = 1\n")


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml")
