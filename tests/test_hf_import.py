"""Real Hugging Face checkpoints load exactly: a tiny random GPT-2 built and saved by transformers itself."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from chatforge.errors import ChatforgeError  # noqa: E402
from chatforge.model.gpt import GPT, GPTConfig  # noqa: E402
from chatforge.model.hf import export_hf_gpt2, load_hf_gpt2  # noqa: E402


def _tiny_hf(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=101, n_positions=40, n_embd=32, n_layer=2, n_head=4)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    return hf


def test_import_matches_transformers_logits(tmp_path):
    hf = _tiny_hf(tmp_path)
    ours = load_hf_gpt2(tmp_path).eval()
    idx = torch.randint(0, 101, (2, 17))
    with torch.no_grad():
        expected = hf(idx).logits
        got, _ = ours(idx)
    assert (got - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("bias", [True, False])
def test_export_loads_in_transformers_with_equal_logits(tmp_path, bias):
    torch.manual_seed(1)
    ours = GPT(GPTConfig(vocab_size=53, block_size=24, n_layer=2, n_head=2, n_embd=16, bias=bias)).eval()
    export_hf_gpt2(ours, tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 53, (2, 11))
    with torch.no_grad():
        assert (hf(idx).logits - ours(idx)[0]).abs().max().item() < 1e-4
    again = load_hf_gpt2(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(again(idx)[0], ours(idx)[0], atol=1e-5)


def test_incompatible_checkpoint_is_named(tmp_path):
    with pytest.raises(ChatforgeError, match="config.json is missing"):
        load_hf_gpt2(tmp_path)
    _tiny_hf(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "llama"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ChatforgeError, match="llama"):
        load_hf_gpt2(tmp_path)
