"""Checkpoint format: round trip, determinism, and exact errors for every kind of damage."""

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from helios.checkpoint import COMPONENTS, count_parameters, init_checkpoint, load_component, \
    read_config, save_component
from helios.config import get_config
from helios.errors import HeliosError


def test_checkpoint_round_trip(tiny_checkpoint, tmp_path):
    cfg = read_config(tiny_checkpoint)
    assert cfg == get_config("tiny")
    for name in COMPONENTS:
        module = load_component(tiny_checkpoint, name, cfg)
        save_component(module, cfg, name, tmp_path)
        a = load_file(str(tiny_checkpoint / name / "model.safetensors"))
        b = load_file(str(tmp_path / name / "model.safetensors"))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert (tiny_checkpoint / name / "config.json").read_text() == \
            (tmp_path / name / "config.json").read_text()
    hf = json.loads((tiny_checkpoint / "ar_backbone" / "config.json").read_text())
    assert hf["architectures"] == ["LlamaForCausalLM"] and hf["vocab_size"] == 256 + 32 + 32 + 8 + 3


def test_loading_gives_the_files_tensors_in_the_asked_dtype_with_tied_embeddings_kept(tmp_path):
    """load_component makes the file's tensors the module's parameters (nothing left on the
    meta device it was built on), in the dtype asked for (float32 by default), and a tied
    AR head shares the embedding's tensor again."""
    cfg = get_config("tiny")
    cfg = dataclasses.replace(cfg, ar_backbone=dataclasses.replace(cfg.ar_backbone,
                                                                   tie_word_embeddings=True))
    ckpt = init_checkpoint(cfg, tmp_path / "tied", seed=1)
    stored = load_file(str(ckpt / "ar_backbone" / "model.safetensors"))
    assert "lm_head.weight" not in stored
    for dtype in (None, torch.bfloat16):
        ar = load_component(ckpt, "ar_backbone", dtype=dtype)
        assert ar.lm_head.weight is ar.model.embed_tokens.weight
        params = dict(ar.named_parameters())
        assert params.keys() == stored.keys()
        for k, p in params.items():
            assert not p.is_meta and p.dtype == (dtype or torch.float32) and p.requires_grad
            assert torch.equal(p, stored[k].to(p.dtype)), k
        assert not ar.training


def test_init_is_deterministic_by_seed(tmp_path):
    a = init_checkpoint("tiny", tmp_path / "a", seed=1)
    b = init_checkpoint("tiny", tmp_path / "b", seed=1)
    c = init_checkpoint("tiny", tmp_path / "c", seed=2)
    wa, wb, wc = (load_file(str(x / "refiner" / "model.safetensors")) for x in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_14b_parameter_counts_without_allocating():
    counts = count_parameters(get_config("14b"))
    total = sum(counts.values())
    assert 13.5e9 < total < 14.5e9
    assert 10.5e9 < counts["ar_backbone"] < 11.5e9
    assert 1.2e9 < counts["refiner"] < 1.8e9


@pytest.fixture
def damaged(tiny_checkpoint, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, dst)
    return dst


def _expect(path, message):
    with pytest.raises(HeliosError) as e:
        for name in COMPONENTS:
            load_component(path, name)
    assert str(e.value) == message
    assert e.value.field == "checkpoint"


def test_a_checkpoint_written_under_earlier_config_names_loads(tiny_checkpoint, tmp_path):
    """Checkpoints written before the config fields were renamed (speculative_tokens ->
    num_draft_tokens; the AR's codebook_size -> plan_vocab_size; plan_tokens_per_frame stored
    beside the refiner's) read as the same configuration."""
    old = tmp_path / "old"
    shutil.copytree(tiny_checkpoint, old)
    index = json.loads((old / "model_index.json").read_text())
    cfg = index["config"]
    cfg["speculative_tokens"] = cfg.pop("num_draft_tokens")
    cfg["plan_tokens_per_frame"] = cfg["refiner"]["plan_tokens_per_frame"]
    for part in ("ar_backbone", "draft"):
        cfg[part]["codebook_size"] = cfg[part].pop("plan_vocab_size")
        component = json.loads((old / part / "config.json").read_text())
        component["codebook_size"] = component.pop("plan_vocab_size")
        (old / part / "config.json").write_text(json.dumps(component))
    (old / "model_index.json").write_text(json.dumps(index))
    assert read_config(old) == read_config(tiny_checkpoint)
    load_component(old, "ar_backbone", read_config(old))


def test_a_file_given_as_checkpoint_is_named_a_file(tmp_path):
    (tmp_path / "README.md").write_text("not a checkpoint")
    with pytest.raises(HeliosError, match="must be a checkpoint folder, .*README.md' is a file"):
        read_config(tmp_path / "README.md")


def test_missing_checkpoint_folder(tmp_path):
    p = tmp_path / "nope"
    _expect(p, f"checkpoint must be a checkpoint folder, '{p}' does not exist")


def test_missing_component_file(damaged):
    (damaged / "refiner" / "model.safetensors").unlink()
    _expect(damaged, f"checkpoint refiner: missing file {damaged / 'refiner' / 'model.safetensors'}")


def test_missing_and_unexpected_tensor(damaged):
    f = damaged / "vae" / "model.safetensors"
    sd = load_file(str(f))
    sd["extra.weight"] = torch.zeros(1)
    save_file(sd, str(f))
    _expect(damaged, f"checkpoint vae: unexpected tensor 'extra.weight' in {f}")
    del sd["extra.weight"], sd["decoder.conv_out.bias"]
    save_file(sd, str(f))
    _expect(damaged, f"checkpoint vae: missing tensor 'decoder.conv_out.bias' in {f}")


def test_wrong_shape_and_mixed_dtype(damaged):
    f = damaged / "ar_backbone" / "model.safetensors"
    sd = load_file(str(f))
    sd["lm_head.weight"] = torch.zeros(10, 128)
    save_file(sd, str(f))
    _expect(damaged, "checkpoint ar_backbone: tensor 'lm_head.weight' has shape [10, 128], "
                     "expected [331, 128]")
    sd["lm_head.weight"] = torch.zeros(331, 128, dtype=torch.float16)
    save_file(sd, str(f))
    _expect(damaged, "checkpoint ar_backbone: tensor 'lm_head.weight' is F16, the others are F32")


def test_config_mismatch(damaged):
    f = damaged / "draft" / "config.json"
    d = json.loads(f.read_text())
    d["num_hidden_layers"] = 3
    f.write_text(json.dumps(d))
    _expect(damaged, f"checkpoint draft: {f} does not match model_index.json")


def test_a_switch_fade_outside_its_range_is_refused(damaged):
    """switch_fade_s (absent from checkpoints written before it: 0.5 s) must be 0 to 5 s."""
    index_file = damaged / "model_index.json"
    index = json.loads(index_file.read_text())
    del index["config"]["switch_fade_s"]
    index_file.write_text(json.dumps(index))
    assert read_config(damaged).switch_fade_s == 0.5
    index["config"]["switch_fade_s"] = -1.0
    index_file.write_text(json.dumps(index))
    with pytest.raises(HeliosError) as e:
        read_config(damaged)
    assert str(e.value) == ("checkpoint config is inconsistent: switch_fade_s must be in "
                            "[0, 5] seconds")


def test_corrupt_weights_file(damaged):
    f = damaged / "text_encoder" / "model.safetensors"
    f.write_bytes(b"not a safetensors file")
    with pytest.raises(HeliosError, match=r"^checkpoint text_encoder: cannot read .*model.safetensors"):
        load_component(damaged, "text_encoder")
