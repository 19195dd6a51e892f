"""The `train` flow's flat parameters come from the config: one list, typed and described there."""

from __future__ import annotations

from prefect.utilities.callables import parameter_schema

from geoloc.compose.params import TRAIN_PARAMS, config_field


def test_flow_form_follows_the_config_fields() -> None:
    """A field's description or type changed in the config shows in the flow's form as is:
    nothing is copied into flows/train.py."""
    from flows.train import train

    props = parameter_schema(train.fn).model_dump()["properties"]
    assert list(props)[: len(TRAIN_PARAMS) + 1] == ["preset", *TRAIN_PARAMS]
    for name, key in TRAIN_PARAMS.items():
        assert props[name]["description"] == config_field(key).description, name
        assert props[name]["default"] is None  # None keeps the preset's value
    assert props["loss"]["anyOf"][0]["enum"] == ["ce", "geosoft", "geosoft_sparse"]
    assert props["epochs"]["anyOf"][0]["type"] == "integer"
