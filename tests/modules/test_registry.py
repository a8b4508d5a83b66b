from __future__ import annotations

import pytest

from autoglm_build.errors import UserError
from autoglm_build.modules import registry


def test_registry_lists_modules_in_pipeline_order():
    assert registry.names() == ["vision", "audio", "embed", "decoder"]


def test_unknown_module_lists_valid_names():
    with pytest.raises(UserError, match="unknown module 'speech'; valid: vision, audio, embed, decoder"):
        registry.get("speech")


def test_every_module_declares_axes_for_every_io(tiny_cfg):
    for name in registry.names():
        spec = registry.get(name)
        axes = spec.dynamic_axes(tiny_cfg)
        for io in spec.input_names(tiny_cfg):
            assert axes[io][0] == spec.batch_axis, (name, io)
        for io in spec.output_names(tiny_cfg):
            assert 0 in axes[io], (name, io)


def test_seeds_differ_per_module_and_follow_config_seed(tiny_cfg):
    seeds = {registry.get(n).seed(tiny_cfg) for n in registry.names()}
    assert len(seeds) == 4
    other = tiny_cfg.model_copy(update={"seed": 1})
    assert registry.get("vision").seed(other) != registry.get("vision").seed(tiny_cfg)
