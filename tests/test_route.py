"""Routing rules: regex strings, value sets with exclusions, numeric ranges, priorities, and config errors."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from appliance.config import Config, Route, parse_config
from appliance.errors import ConfigError
from appliance.route import condition_holds, plan


def ds(**kw: object) -> Dataset:
    d = Dataset()
    for k, v in kw.items():
        setattr(d, k, v)
    return d


@pytest.mark.parametrize("cond, value, expected", [
    ("CT", "CT", True),
    ("CT", "ct", True),               # case-insensitive
    ("CT", "CTX", False),             # whole value, not a substring
    ("C[TR]", "CR", True),
    ("CT", None, False),              # missing attribute
    (["ABDOMEN", "LIVER", "!HEAD"], "LIVER", True),
    (["ABDOMEN", "LIVER", "!HEAD"], "HEAD", False),
    (["ABDOMEN", "LIVER", "!HEAD"], "CHEST", False),
    (["ABDOMEN", "LIVER", "!HEAD"], None, False),
    (["!HEAD", "!BRAIN"], None, True),        # exclusions alone admit a missing attribute
    (["!HEAD", "!BRAIN"], "ABDOMEN", True),
    (["!HEAD", "!BRAIN"], "brain", False),
    ([0.5, 5.0], "2.5", True),
    ([0.5, 5.0], "5", True),
    ([0.5, 5.0], "7.5", False),
    ([0.5, 5.0], None, False),
])
def test_condition(cond, value, expected) -> None:
    key = "SliceThickness" if isinstance(cond, list) and isinstance(cond[0], float) else "BodyPartExamined"
    if isinstance(cond, str):
        key = "Modality"
    d = ds() if value is None else ds(**{key: value})
    assert condition_holds(d, key, cond) is expected


def test_multi_valued_attribute_matches_any_value() -> None:
    d = ds(ImageType=["ORIGINAL", "PRIMARY", "AXIAL"])
    assert condition_holds(d, "ImageType", "AXIAL")
    assert not condition_holds(d, "ImageType", ["!PRIMARY"])


def test_plan_merges_models_and_takes_highest_priority() -> None:
    rules = [
        Route(name="liver", match={"Modality": "CT"}, models=["liver", "spleen"], destinations=["pacs"], priority=0),
        Route(name="stat", match={"Modality": "CT", "StudyDescription": ".*TRAUMA.*"}, models=["liver"],
              destinations=["er"], priority=10),
        Route(name="mr", match={"Modality": "MR"}, models=["brain"]),
    ]
    jobs = plan(ds(Modality="CT", StudyDescription="CT TRAUMA ABD"), rules)
    assert [(j.model, j.priority, j.destinations) for j in jobs] == [("liver", 10, ["pacs", "er"]), ("spleen", 0, ["pacs"])]
    assert plan(ds(Modality="US"), rules) == []


def test_routing_config_contract() -> None:
    cfg = parse_config({
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "10.0.0.5", "port": 104}],
        "routes": [{"name": "liver", "match": {"Modality": "CT", "BodyPartExamined": ["ABDOMEN", "LIVER", "!HEAD"],
                                              "SliceThickness": [0.5, 5.0]},
                    "models": ["liver-ct-demo"], "destinations": ["pacs"], "priority": 0}],
    })
    assert cfg.routes[0].match["SliceThickness"] == [0.5, 5.0]
    assert Config().routes[0].models == ["liver-ct-demo"]  # embedded default


@pytest.mark.parametrize("route, message", [
    ({"name": "x", "match": {"Modalty": "CT"}, "models": ["m"]}, "'Modalty' is not a DICOM keyword"),
    ({"name": "x", "match": {"Modality": "C[T"}, "models": ["m"]}, "not a valid regular expression"),
    ({"name": "x", "match": {"SliceThickness": [5, 1]}, "models": ["m"]}, "min > max"),
    ({"name": "x", "match": {"SliceThickness": [1, "a"]}, "models": ["m"]}, "numeric [min, max]"),
    ({"name": "x", "match": {}, "models": []}, "routes.0.models"),
    ({"name": "x", "match": {}, "models": ["m"], "destinations": ["nowhere"]}, "'nowhere' is not defined"),
    ({"name": "x", "match": {}, "models": ["m"], "prio": 1}, "routes.0.prio: unknown key"),
])
def test_bad_routes_are_named(route, message) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"routes": [route]})
    assert message in str(err.value)
