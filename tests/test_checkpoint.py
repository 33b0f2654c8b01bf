"""Checkpoints: atomic writes, the latest pointer, loading from checkpoint/run/HF folders, incompatible resumes."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from train_helpers import CountingTask, fast_config, tiny_gpt

from chatforge.errors import ChatforgeError
from chatforge.model.checkpoint import (
    latest_checkpoint,
    load_model,
    load_trainer_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
    tokenizer_path,
)
from chatforge.model.hf import export_hf_gpt2
from chatforge.train.loop import train


def _save(run, step, model, tokenizer=None, keep=2):
    return save_checkpoint(run, step, model, {"step": step}, {"model": model.config.to_dict()}, tokenizer, keep=keep)


def _logits(model):
    idx = torch.arange(12).view(2, 6)
    with torch.no_grad():
        return model(idx)[0]


def test_checkpoints_are_atomic_and_the_previous_one_survives_a_failed_save(tmp_path):
    model = tiny_gpt()
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    for step in (1, 2, 3):
        _save(tmp_path, step, model, tmp_path / "tok")
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002", "step_00000003"]
    assert latest_checkpoint(tmp_path) == latest_checkpoint(root) == root / "step_00000003"
    with pytest.raises(ChatforgeError, match="tokenizer not found"):
        _save(tmp_path, 4, model, tmp_path / "missing")
    # nothing half-written is left behind and the pointer still names the last good checkpoint
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002", "step_00000003"]
    assert latest_checkpoint(tmp_path).name == "step_00000003"
    assert json.loads((root / "step_00000003" / "config.json").read_text())["step"] == 3
    assert load_trainer_state(root / "step_00000003") == {"step": 3}


def test_latest_checkpoint_skips_incomplete_folders(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    _save(tmp_path, 5, tiny_gpt())
    broken = tmp_path / "checkpoints" / "step_00000009"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"")
    (tmp_path / "checkpoints" / "latest").write_text("step_00000009\n")
    assert latest_checkpoint(tmp_path).name == "step_00000005"


def test_load_model_from_a_checkpoint_a_run_dir_and_a_hugging_face_folder(tmp_path):
    model = tiny_gpt().eval()
    (tmp_path / "tok.json").write_text('{"fake": true}')
    folder = _save(tmp_path / "run", 7, model, tmp_path / "tok.json")
    export_hf_gpt2(model, tmp_path / "hf")
    expected = _logits(model)
    for path in (folder, tmp_path / "run", tmp_path / "hf"):
        loaded, info = load_model(path)
        assert not loaded.training and loaded.config.n_embd == 32
        torch.testing.assert_close(_logits(loaded), expected, atol=1e-5, rtol=1e-5)
    assert load_model(tmp_path / "run")[1]["step"] == 7
    assert tokenizer_path(tmp_path / "run") == folder / "tokenizer.json"
    assert tokenizer_path(folder).read_text() == '{"fake": true}'
    with pytest.raises(ChatforgeError, match="no tokenizer found"):
        tokenizer_path(tmp_path / "hf")


def test_load_model_reads_a_wrapped_gpt_under_its_prefix(tmp_path):
    class ValueModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gpt = tiny_gpt()
            self.value = torch.nn.Linear(32, 1)

    wrapped = ValueModel()
    save_checkpoint(tmp_path, 1, wrapped, {}, {"model": wrapped.gpt.config.to_dict(), "model_prefix": "gpt."})
    loaded, _ = load_model(tmp_path)
    torch.testing.assert_close(_logits(loaded), _logits(wrapped.gpt.eval()))


def test_missing_and_foreign_paths_are_named(tmp_path):
    with pytest.raises(ChatforgeError, match="checkpoint not found"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ChatforgeError, match="no checkpoint in"):
        load_model(tmp_path / "empty")


def test_rng_state_round_trips():
    state = rng_state()
    first = (torch.rand(3), np.random.rand(), random.random())
    set_rng_state(state)
    again = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]


def test_incompatible_checkpoint_is_a_clear_error_and_nothing_is_overwritten(tmp_path):
    train(tiny_gpt(), CountingTask(), fast_config(steps=3), tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(
        ChatforgeError, match=r"incompatible with this model: it has n_embd=32 but this run has n_embd=64"
    ):
        train(tiny_gpt(n_embd=64), CountingTask(), fast_config(steps=6), tmp_path, resume=True)
    with pytest.raises(ChatforgeError, match="already holds checkpoints.*--resume"):
        train(tiny_gpt(), CountingTask(), fast_config(steps=6), tmp_path)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_sharded_weights_export_to_one_safetensors_file_a_few_tensors_at_a_time(tmp_path, monkeypatch):
    """export_sharded writes the tensors of a torch.distributed.checkpoint folder as the safetensors file that
    save_file would, whatever their dtypes and shapes (a scalar included), reading them in groups."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    from chatforge.model import weights

    tensors = {"b.weight": torch.randn(5, 3), "a.scale": torch.tensor(2.5), "c.half": torch.randn(7).bfloat16(),
               "d.count": torch.arange(6).reshape(2, 3), "e.mask": torch.tensor([True, False, True])}
    dcp.save(tensors, checkpoint_id=tmp_path / "shards", no_dist=True)
    monkeypatch.setattr(weights, "EXPORT_GROUP_BYTES", 40)  # several groups, one tensor larger than a group
    weights.export_sharded(tmp_path / "shards", tmp_path / "model.safetensors", {"step": "3"})
    assert weights.safetensors_problem(tmp_path / "model.safetensors") is None
    exported = load_file(str(tmp_path / "model.safetensors"))
    assert exported.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
