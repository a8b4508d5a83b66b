"""autoglm_build/layout.py and scripts/make_layout_checkpoint.py: seeded random weights laid out as the
published GLM-4.1V-9B / AutoGLM-Phone-9B checkpoint (BF16 shards, index, config.json)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autoglm_build.errors import UserError
from autoglm_build.layout import GENERATOR, INDEX_NAME, layout, write_checkpoint
from autoglm_build.weights import DTYPE_BYTES, Checkpoint, read_header
from tests.conftest import ROOT, TINY

SCRIPT = ROOT / "scripts" / "make_layout_checkpoint.py"


def _make(out: Path, *args: str) -> Path:
    run = subprocess.run([sys.executable, str(SCRIPT), "-c", str(TINY), "-o", str(out), *args],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "peak RSS" in run.stdout
    return out


def _files(directory: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_names_and_shapes_are_transformers_glm4v_plus_our_speech_module(tiny_cfg):
    from transformers import Glm4vForConditionalGeneration

    from autoglm_build.modules.hf_configs import glm4v_config

    with torch.device("meta"):
        glm = Glm4vForConditionalGeneration(glm4v_config(tiny_cfg)).state_dict()
    specs = {s.name: s for s in layout(tiny_cfg)}
    ours = {name: spec.shape for name, spec in specs.items() if not name.startswith("audio_")}
    assert ours == {name: tuple(t.shape) for name, t in glm.items()}
    assert {name.split(".")[0] for name in specs} == {"model", "lm_head", "audio_encoder", "audio_projector"}
    t = tiny_cfg.text
    assert specs["model.language_model.layers.1.self_attn.k_proj.bias"].shape == (t.num_key_value_heads * t.head_dim,)
    assert specs["lm_head.weight"].shape == (t.vocab_size, t.hidden_size)
    assert specs["model.language_model.norm.weight"].kind == "norm"
    assert specs["model.visual.merger.post_projection_norm.bias"].kind == "bias"
    assert specs["audio_projector.linear_1.weight"].kind == "matrix"


def test_script_writes_shards_an_index_and_config_json_the_same_bytes_twice(tmp_path, tiny_cfg):
    first = _files(_make(tmp_path / "a", "--shard-mib", "1"))
    assert first == _files(_make(tmp_path / "b", "--shard-mib", "1"))
    assert first == _files(_make(tmp_path / "c", "--shard-mib", "1", "--workers", "3"))  # shards in parallel
    shards = sorted(n for n in first if n.endswith(".safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads(first[INDEX_NAME])
    headers = {n: read_header(tmp_path / "a" / n) for n in shards}
    held = {key: name for name, header in headers.items() for key in header if key != "__metadata__"}
    assert index["weight_map"] == held and list(index["weight_map"]) == sorted(held)
    entries = [e for header in headers.values() for k, e in header.items() if k != "__metadata__"]
    assert {e["dtype"] for e in entries} == {"BF16"}
    assert index["metadata"]["total_size"] == sum(e["data_offsets"][1] - e["data_offsets"][0] for e in entries)
    assert all(len(b) <= 2**20 + 4096 for n, b in first.items() if n in shards and len(headers[n]) > 2)
    hf = json.loads(first["config.json"])
    assert hf["architectures"] == ["Glm4vForConditionalGeneration"] and hf["dtype"] == "bfloat16"
    assert hf["text_config"]["num_hidden_layers"] == tiny_cfg.text.num_hidden_layers
    Checkpoint(tmp_path / "a").check_config(tiny_cfg)  # the loader's own reading of config.json agrees


def test_values_depend_on_the_seed_and_the_name_not_on_the_sharding(tmp_path, tiny_cfg):
    from safetensors.torch import load_file

    write_checkpoint(tiny_cfg, tmp_path / "one")
    write_checkpoint(tiny_cfg, tmp_path / "many", shard_mib=0.25)
    write_checkpoint(tiny_cfg, tmp_path / "other", seed=1)
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["config.json", "model.safetensors"]
    one = load_file(str(tmp_path / "one" / "model.safetensors"))
    many = {}
    for path in (tmp_path / "many").glob("*.safetensors"):
        many.update(load_file(str(path)))
    other = load_file(str(tmp_path / "other" / "model.safetensors"))
    assert one.keys() == many.keys() == other.keys()
    assert all(torch.equal(one[k], many[k]) for k in one)
    assert not any(torch.equal(one[k], other[k]) for k in one if "norm" not in k)
    norm = one["model.language_model.norm.weight"].float()
    assert 0.9 < norm.mean() < 1.1 and abs(float(one["lm_head.weight"].float().std()) - 0.02) < 0.002


def test_rewriting_with_fewer_shards_leaves_no_stale_shard(tmp_path, tiny_cfg):
    write_checkpoint(tiny_cfg, tmp_path, shard_mib=0.5)
    write_checkpoint(tiny_cfg, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_transformers_loads_it_with_nothing_missing(tmp_path, tiny_cfg):
    from transformers import Glm4vForConditionalGeneration

    write_checkpoint(tiny_cfg, tmp_path, shard_mib=1)
    model, info = Glm4vForConditionalGeneration.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert {k.split(".")[0] for k in info["unexpected_keys"]} == {"audio_encoder", "audio_projector"}
    assert model.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype, tag", [("fp16", "F16"), ("fp32", "F32")])
def test_other_dtypes(tmp_path, tiny_cfg, dtype, tag):
    summary = write_checkpoint(tiny_cfg, tmp_path, dtype=dtype)
    header = read_header(tmp_path / "model.safetensors")
    assert {e["dtype"] for k, e in header.items() if k != "__metadata__"} == {tag}
    assert summary["total_size"] == summary["parameters"] * DTYPE_BYTES[tag]


def test_a_directory_it_did_not_write_is_refused_in_one_line_and_left_untouched(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "model.safetensors").write_bytes(b"real weights")
    (real / "config.json").write_text("{}")
    before = _files(real)
    run = subprocess.run([sys.executable, str(SCRIPT), "-c", str(TINY), "-o", str(real)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines() == [run.stderr.strip()]
    assert str(real) in run.stderr and "model.safetensors" in run.stderr
    assert _files(real) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["real"]  # no temp directory left beside it


def test_a_real_safetensors_shard_without_its_mark_is_refused(tmp_path, tiny_cfg):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match="not written by autoglm_build.layout"):
        write_checkpoint(tiny_cfg, tmp_path)


def test_its_own_output_is_replaced_whole(tmp_path, tiny_cfg):
    out = tmp_path / "ckpt"
    write_checkpoint(tiny_cfg, out, shard_mib=0.5, seed=1)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and all(read_header(s)["__metadata__"]["generator"] == GENERATOR for s in shards)
    write_checkpoint(tiny_cfg, out)
    fresh = tmp_path / "fresh"
    write_checkpoint(tiny_cfg, fresh)
    assert _files(out) == _files(fresh)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "fresh"]


def test_a_failure_mid_write_leaves_the_old_checkpoint_and_no_temp_directory(tmp_path, tiny_cfg, monkeypatch):
    import autoglm_build.layout as layout_module

    out = tmp_path / "ckpt"
    write_checkpoint(tiny_cfg, out, shard_mib=0.5)
    before = _files(out)
    real_write = layout_module.write_shard
    failed = []

    def fail_second(path, *args):
        if path.name.startswith("model-00002-"):
            failed.append(path)
            raise OSError(28, "No space left on device", str(path))
        return real_write(path, *args)

    monkeypatch.setattr(layout_module, "write_shard", fail_second)
    with pytest.raises(UserError, match="No space left on device") as err:
        write_checkpoint(tiny_cfg, out, shard_mib=0.5, seed=1)
    assert str(failed[0]) in err.value.message and str(out) in err.value.hint
    assert _files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    with pytest.raises(UserError):
        write_checkpoint(tiny_cfg, tmp_path / "new", shard_mib=0.5)
    assert not (tmp_path / "new").exists()
