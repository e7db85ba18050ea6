"""docs/configuration.md is generated from ap_vllm/config.py (``make docs``) and must not drift from it."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest

from ap_vllm import config as cfg

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def test_committed_reference_is_the_generated_one():
    assert DOC.read_text() == cfg.config_reference_markdown(), (
        "docs/configuration.md is out of date: run `make docs` (python -m ap_vllm.config --out docs/configuration.md)")


def test_every_field_is_documented():
    text = cfg.config_reference_markdown()
    for name, field in cfg.AttentionPackConfig.model_fields.items():
        assert f"| `{name}` |" in text
        assert field.description, f"{name} has no description"


def test_every_validated_field_states_what_is_allowed():
    """A field with a validator has bounds or words in the 'allowed values' column."""
    validated = {f for dec in cfg.AttentionPackConfig.__pydantic_decorators__.field_validators.values()
                 for f in dec.info.fields}
    missing = sorted(validated - set(cfg._BOUNDS) - set(cfg._ALLOWED_NOTES))
    assert not missing, f"add these to _BOUNDS or _ALLOWED_NOTES in ap_vllm/config.py: {missing}"


@pytest.mark.parametrize("name", sorted(cfg._BOUNDS))
def test_documented_bounds_are_the_validated_ones(name):
    lo, lo_in, hi, hi_in = cfg._BOUNDS[name]
    annotation = cfg.AttentionPackConfig.model_fields[name].annotation
    step = 1e-3 if float in (annotation, *typing.get_args(annotation)) else 1

    def ok(value) -> bool:
        try:
            cfg.parse_config({name: value})
            return True
        except cfg.AttentionPackConfigError:
            return False

    assert ok(lo) is lo_in and ok(lo + step) and not ok(lo - step)
    if hi is not None:
        assert ok(hi) is hi_in and ok(hi - step) and not ok(hi + step)
