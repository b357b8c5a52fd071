"""
Checkpoints for the benchmarks, written into a temp dir (never the repo): an LLM-shaped state
dict (~2 GB of bf16 in ~330 tensors, a few with NaN/Inf), and a file of 20,000 small tensors.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


def llm_state_dict(*, layers: int = 36, hidden: int = 1536, intermediate: int = 4096, vocab: int = 32000,
                   dtype: torch.dtype = torch.bfloat16, seed: int = 0, poison: bool = True) -> dict[str, torch.Tensor]:
    """A Llama-shaped state dict: 9 tensors per layer plus embeddings, final norm and head (327 at defaults)."""
    generator = torch.Generator().manual_seed(seed)

    def weight(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * 0.02).to(dtype)

    state = {"model.embed_tokens.weight": weight(vocab, hidden)}
    for i in range(layers):
        prefix = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            state[prefix + f"self_attn.{name}.weight"] = weight(hidden, hidden)
        state[prefix + "mlp.gate_proj.weight"] = weight(intermediate, hidden)
        state[prefix + "mlp.up_proj.weight"] = weight(intermediate, hidden)
        state[prefix + "mlp.down_proj.weight"] = weight(hidden, intermediate)
        state[prefix + "input_layernorm.weight"] = torch.ones(hidden, dtype=dtype)
        state[prefix + "post_attention_layernorm.weight"] = torch.ones(hidden, dtype=dtype)
    state["model.norm.weight"] = torch.ones(hidden, dtype=dtype)
    state["lm_head.weight"] = weight(vocab, hidden)
    if poison:
        state["model.layers.3.mlp.up_proj.weight"][5, :7] = float("nan")
        state["model.layers.7.self_attn.v_proj.weight"][0, 0] = float("inf")
        state["model.layers.7.self_attn.v_proj.weight"][1, 1] = float("-inf")
    return state


def make_llm_checkpoint(path: str | os.PathLike[str], **kwargs: object) -> Path:
    """Write `llm_state_dict(**kwargs)` with torch.save (or safetensors for a .safetensors path)."""
    path = Path(path)
    state = llm_state_dict(**kwargs)  # type: ignore[arg-type]
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, path)
    else:
        torch.save(state, path)
    return path


def make_many_tensors(path: str | os.PathLike[str], count: int = 20_000) -> Path:
    """`count` small tensors in blocks of 10 (a deep transformer's worth of names)."""
    path = Path(path)
    state = {}
    for i in range(count // 10):
        prefix = f"encoder.layer.{i}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                     "intermediate.dense"):
            state[prefix + name + ".weight"] = torch.randn(8, 8)
            state[prefix + name + ".bias"] = torch.zeros(8)
    torch.save(state, path)
    return path


def drop_page_cache(path: str | os.PathLike[str]) -> bool:
    """Ask the kernel to forget the file's cached pages (cold reads); False where it cannot."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True
