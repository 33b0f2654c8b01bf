"""Import and export Hugging Face GPT-2 checkpoints (``config.json`` + ``model.safetensors``).

Our module names are GPT-2's, so the mapping is a prefix (``transformer.``) and a transpose of the weights
that GPT-2 stores as Conv1D ([in, out]) rather than Linear ([out, in]).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from chatforge import io
from chatforge.errors import ChatforgeError
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.model.weights import read_safetensors, recorded_gpt_config, shape_difference

_CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_SUPPORTED_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")


def _config_from_hf(hf: dict, path: Path) -> GPTConfig:
    """The GPTConfig of a HF GPT-2 config.json; a missing, mistyped or out-of-range field is a ChatforgeError."""
    if hf.get("model_type") != "gpt2":
        raise ChatforgeError(f"{path}: model_type {hf.get('model_type')!r} is not supported (only 'gpt2')")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in _SUPPORTED_ACTIVATIONS:
        raise ChatforgeError(
            f"{path}: activation_function {activation!r} not supported ({', '.join(_SUPPORTED_ACTIVATIONS)})"
        )
    names = {"vocab_size": "vocab_size", "n_positions": "block_size", "n_layer": "n_layer", "n_head": "n_head",
             "n_embd": "n_embd"}
    missing = [name for name in names if name not in hf]
    if missing:
        raise ChatforgeError(f"{path}: no {', '.join(missing)}")
    values = {ours: hf[theirs] for theirs, ours in names.items()}
    config = recorded_gpt_config(path, {**values, "dropout": 0.0, "bias": True,
                                        "layer_norm_eps": hf.get("layer_norm_epsilon", 1e-5)})
    if hf.get("n_inner") not in (None, 4 * config.n_embd):
        raise ChatforgeError(f"{path}: n_inner={hf['n_inner']} not supported (must be 4 * n_embd)")
    return config


def load_hf_gpt2(directory: str | Path, device: str | torch.device = "cpu") -> GPT:
    """Build a chatforge GPT from a Hugging Face GPT-2 directory (config.json + model.safetensors)."""
    directory = Path(directory)
    config_path, weights_path = directory / "config.json", directory / "model.safetensors"
    for p in (config_path, weights_path):
        if not p.is_file():
            raise ChatforgeError(f"not a Hugging Face checkpoint: {p} is missing")
    cfg = _config_from_hf(io.read_json(config_path, "Hugging Face config"), config_path)
    state = {}
    for name, tensor in read_safetensors(weights_path, device).items():
        if name.startswith("lm_head.") or name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # lm_head is tied to wte; attn.bias is GPT-2's stored causal mask
        ours = name.removeprefix("transformer.")
        state[ours] = tensor.t().contiguous() if ours.endswith(_CONV1D_SUFFIXES) and tensor.dim() == 2 else tensor
    with torch.device("meta"):  # shapes only: a config naming a huge model allocates nothing before the check
        expected = {k: tuple(v.shape) for k, v in GPT(cfg).state_dict().items()}
    mismatch = shape_difference({k: tuple(v.shape) for k, v in state.items()}, expected)
    if mismatch:
        raise ChatforgeError(f"{weights_path}: weights do not fit the GPT-2 of {config_path} ({mismatch})")
    model = GPT(cfg).to(device)
    model.load_state_dict(state)
    return model


def export_hf_gpt2(model: GPT, directory: str | Path, eos_token_id: int | None = None) -> None:
    """Write ``model`` as a Hugging Face GPT-2 checkpoint that ``GPT2LMHeadModel.from_pretrained`` loads."""
    cfg = model.config
    if cfg.arch != "gpt2":
        raise ChatforgeError(f"only arch=gpt2 models export to the GPT-2 format; this model is arch={cfg.arch} "
                             "(train with --model.arch=gpt2 to export)")
    directory = Path(directory)
    state = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().float().cpu()
        state["transformer." + name] = (
            tensor.t().contiguous() if name.endswith(_CONV1D_SUFFIXES) else tensor.contiguous()
        )
    if not cfg.bias:  # GPT-2 always has biases; zeros are the exact equivalent
        for name, tensor in list(state.items()):
            if name.endswith(".weight") and not name.endswith(("wte.weight", "wpe.weight")):
                out_dim = tensor.shape[1] if name.endswith(_CONV1D_SUFFIXES) else tensor.shape[0]
                state.setdefault(name[: -len("weight")] + "bias", torch.zeros(out_dim))
    hf_config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": cfg.layer_norm_eps,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "tie_word_embeddings": True,
        "bos_token_id": eos_token_id,
        "eos_token_id": eos_token_id,
    }
    with io.atomic_path(directory / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    io.write_json(directory / "config.json", hf_config)
