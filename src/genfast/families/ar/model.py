"""The transformer of the `ar` family: a GPT over image tokens after a condition prefix.

nanoGPT's block (pre-LayerNorm, multi-head attention through
scaled_dot_product_attention, a 4x GELU MLP) over the tokenizer's grid read row by
row, after `prefix_tokens` positions that carry the condition: a learned embedding
per class, a projected MiniLM prompt embedding (text.py), or the learned null prefix
(what classifier-free guidance needs). The caches and the one-token `Step` are what
the cached decoders (decoders.py) run.

The `scales` objective (next-scale prediction, VAR: Tian et al., 2024) reads a
multi-scale tokenizer's sequence (tokenizer.py), all tokens of a scale predicted
together: the input at a scale's positions is the coarser scales' accumulated grid,
downsampled to that scale (the tokenizer's `scale_input`; a vector, projected by
`wte`, instead of a token id), plus a position and a scale embedding, and attention is
block-causal: a position sees the condition, its own scale and the coarser ones. The
first scale's input is the empty grid: with the condition, it is VAR's start token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from genfast.errors import GenfastError
from genfast.families.ar.text import EMBEDDING_DIM
from genfast.families.base import Exported, TrainedConfig


@dataclass
class ARConfig(TrainedConfig):
    tokenizer: str = ""          # VQ-VAE checkpoint or shipped name (default: the shipped vqvae-<data set>)
    tokenizer_config: str = ""   # that tokenizer's config as JSON: filled in when training starts
    text: bool = False           # condition on text prompts (MiniLM) rather than class labels
    captions: str = "corpus"     # text models' training captions: corpus (per image) | classes (text.py)
    caption_pool: int = 32       # corpus captions drawn and embedded per class and attribute levels
    phrasings: int = 0           # phrasings a class index stands for (text models): filled in when training starts
    objective: str = "causal"    # causal (GPT) | masked (MaskGIT) | scales (VAR: next-scale, multi-scale tokenizer)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 192
    dropout: float = 0.1
    prefix_tokens: int = 1       # positions the condition takes at the start of the sequence
    p_uncond: float = 0.1        # chance a training example's condition is dropped (for guidance)
    lr: float = 1e-3
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 200
    # How `genfast sample` decodes unless told otherwise.
    decode: str = "kv"
    cfg: float = 1.0
    temperature: float = 1.0
    top_k: int = 0
    parallel_steps: int = 8
    choice_temperature: float = 4.5  # MaskGIT: the Gumbel noise on its confidences at the first step
    jacobi_window: int = 16
    cfg_schedule: str = "constant"           # next-scale: "linear" ramps guidance up over the scales (VAR's)
    last_scale_temperature: float | None = None  # next-scale: the finest scale's temperature (None: temperature)


PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "tiny": {"n_layer": 1, "n_head": 2, "n_embd": 16, "batch_size": 32, "warmup_steps": 0},
}


class Attention(nn.Module):
    def __init__(self, c: ARConfig):
        super().__init__()
        self.heads = c.n_head
        self.qkv = nn.Linear(c.n_embd, 3 * c.n_embd)
        self.proj = nn.Linear(c.n_embd, c.n_embd)
        self.dropout = c.dropout
        self.causal = c.objective == "causal"

    def forward(self, x: torch.Tensor, cache=None, layer: int = 0, positions: torch.Tensor | None = None,
                mask: torch.Tensor | None = None):
        batch, n, width = x.shape
        q, k, v = (t.view(batch, n, self.heads, -1).transpose(1, 2) for t in self.qkv(x).split(width, dim=2))
        dropout = self.dropout if self.training else 0.0
        if cache is None:  # the whole sequence: causal, bidirectional, or through `mask` (block-causal)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=self.causal)
        else:
            k, v, mask = cache.update(layer, k, v, positions)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(batch, n, width))


class Block(nn.Module):
    def __init__(self, c: ARConfig):
        super().__init__()
        self.ln1, self.attn, self.ln2 = nn.LayerNorm(c.n_embd), Attention(c), nn.LayerNorm(c.n_embd)
        self.mlp = nn.Sequential(nn.Linear(c.n_embd, 4 * c.n_embd), nn.GELU(), nn.Linear(4 * c.n_embd, c.n_embd),
                                 nn.Dropout(c.dropout))

    def forward(self, x, cache=None, layer=0, positions=None, mask=None):
        x = x + self.attn(self.ln1(x), cache, layer, positions, mask)
        return x + self.mlp(self.ln2(x))


class DynamicCache:
    """Keys and values of every position so far, grown by concatenation (`kv`)."""

    def __init__(self):
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def grow(self, layer, k, v):
        if layer in self.keys:
            k, v = torch.cat([self.keys[layer], k], 2), torch.cat([self.values[layer], v], 2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def update(self, layer, k, v, positions):
        k, v = self.grow(layer, k, v)
        return k, v, torch.arange(k.shape[2], device=k.device)[None] <= positions[:, None]


class ScaleCache(DynamicCache):
    """The same, grown a scale at a time (`scales`): a pass over a scale sees all it holds, the
    coarser scales' and its own, so no mask."""

    def update(self, layer, k, v, positions):
        return *self.grow(layer, k, v), None


class StaticCache(nn.Module):
    """Keys and values in buffers of the full sequence length, written in place at the
    step's positions; attention covers all slots through a mask (`static`). Buffers, so
    that a compiled or graph-captured step sees the same tensors on every call."""

    def __init__(self, layers: int, batch: int, heads: int, length: int, head_dim: int, device, dtype):
        super().__init__()
        shape = (layers, batch, heads, length, head_dim)
        self.register_buffer("keys", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("values", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("slots", torch.arange(length, device=device), persistent=False)

    def update(self, layer, k, v, positions):
        self.keys[layer].index_copy_(2, positions, k)
        self.values[layer].index_copy_(2, positions, v)
        return self.keys[layer], self.values[layer], self.slots[None] <= positions[:, None]


class Step(nn.Module):
    """One decoding step over a cache: the prefix in one pass (`prefill`), then
    (tokens (B, 1), position (1,)) -> logits (B, V) a token at a time. Over a
    StaticCache every token step has the same shapes, so `compile` and `cudagraph` can
    wrap it (the LlamaGen / gpt-fast recipe); its cache is reused across calls without
    clearing, since a slot is read only after the call has written it."""

    def __init__(self, net: ARNet, cache: DynamicCache | StaticCache):
        super().__init__()
        self.net, self.cache = net, cache

    def prefill(self, prefix: torch.Tensor) -> torch.Tensor:
        return self.net.step(prefix, self.cache, torch.arange(prefix.shape[1], device=prefix.device))[:, -1]

    def forward(self, tokens: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        return self.net.step(self.net.wte(tokens), self.cache, position)[:, -1]


class ARNet(nn.Module):
    """The transformer and its conditioning: (prefix, tokens) -> next-token logits (next-scale
    logits for `scales`). grid_tokens is the tokenizer's tokens per image; a `scales` model
    also takes its scales' sides and its code vectors' size."""

    def __init__(self, c: ARConfig, vocab_size: int, grid_tokens: int, sides: tuple[int, ...] = (),
                 code_dim: int = 0):
        super().__init__()
        self.vocab_size, self.sequence_length, self.prefix_tokens = vocab_size, grid_tokens, c.prefix_tokens
        self.mask_token = vocab_size  # an extra embedding row (masked objective)
        self.objective = c.objective
        self.text, self.conditional, self.num_classes = c.text, c.conditional or c.text, c.num_classes
        self.width, self.heads, self.layers = c.n_embd, c.n_head, c.n_layer
        if c.objective == "scales":
            self.wte = nn.Linear(code_dim, c.n_embd)  # inputs are grids' vectors, not token ids
            # Each position's scale (its scale embedding's row); a position attends to the positions
            # of its scale and the coarser ones (block-causal). The condition counts as the first
            # scale, whose input is always the empty grid (with it, VAR's start token): so the first
            # pass of a cached decode, condition and first scale together, attends as the whole
            # sequence does.
            scales = [0] * c.prefix_tokens + [k for k, side in enumerate(sides) for _ in range(side * side)]
            self.register_buffer("scale_of", torch.tensor(scales), persistent=False)
            self.register_buffer("scale_mask", self.scale_of[None] <= self.scale_of[:, None], persistent=False)
            self.scale_embedding = nn.Embedding(len(sides), c.n_embd)
        else:
            self.wte = nn.Embedding(vocab_size + 1, c.n_embd)
        self.wpe = nn.Embedding(c.prefix_tokens + grid_tokens, c.n_embd)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd)
        self.head = nn.Linear(c.n_embd, vocab_size, bias=False)
        prefix_width = c.prefix_tokens * c.n_embd
        self.null = nn.Parameter(torch.zeros(prefix_width))
        if c.text:
            self.project = nn.Linear(EMBEDDING_DIM, prefix_width)
            self.register_buffer("captions", torch.zeros(c.num_classes, c.phrasings, EMBEDDING_DIM))
        elif self.conditional:
            self.classes = nn.Embedding(c.num_classes, prefix_width)
        self.apply(self._init)

    @staticmethod
    def _init(module):  # GPT-2's initialisation
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    # --- conditioning ---------------------------------------------------------------------

    def null_prefix(self, batch: int) -> torch.Tensor:
        return self.null.view(1, self.prefix_tokens, -1).expand(batch, -1, -1)

    def prefix(self, condition: torch.Tensor) -> torch.Tensor:
        """(B, P, C) prefix for class ids (B,) (-1: none) or prompt embeddings (B, 384)
        (an all-zero row: none)."""
        if not self.conditional:
            return self.null_prefix(len(condition))
        if condition.is_floating_point():  # prompt embeddings
            if not self.text:
                raise GenfastError("this model is conditioned on classes, not text prompts")
            none = condition.abs().sum(-1) == 0
            mapped = self.project(condition.to(self.null.dtype))
        else:
            none, ids = condition < 0, condition.clamp_min(0)
            # A class on a text model stands for the mean of its training phrasings.
            mapped = self.project(F.normalize(self.captions[ids].mean(1), dim=-1)) if self.text else self.classes(ids)
        mapped = torch.where(none[:, None], self.null[None], mapped)
        return mapped.view(len(condition), self.prefix_tokens, -1)

    # --- the transformer ------------------------------------------------------------------

    def forward(self, prefix: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Logits at every position of [prefix, tokens] (no cache). Tokens are ids (B, T), or
        for `scales` the next-scale inputs (B, T, code_dim) (tokenizer.next_scale_inputs)."""
        x = torch.cat([prefix, self.wte(tokens)], 1)
        length = x.shape[1]
        x = self.drop(x + self.position_embedding(torch.arange(length, device=x.device)))
        mask = self.scale_mask[:length, :length] if self.objective == "scales" else None
        for block in self.blocks:
            x = block(x, mask=mask)
        return self.head(self.ln_f(x))

    def position_embedding(self, positions: torch.Tensor) -> torch.Tensor:
        if self.objective == "scales":
            return self.wpe(positions) + self.scale_embedding(self.scale_of[positions])
        return self.wpe(positions)

    def step(self, x: torch.Tensor, cache, positions: torch.Tensor) -> torch.Tensor:
        """Logits of new positions (embeddings x at `positions`), reading and extending `cache`."""
        x = x + self.position_embedding(positions)
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer, positions)
        return self.head(self.ln_f(x))

    def exported(self) -> Exported:
        """The full-sequence pass for an exporting engine: pure already, no state; the batch
        and the number of tokens dynamic, so one export serves jacobi and parallel alike."""
        batch = torch.export.Dim("batch", min=1)
        tokens = torch.export.Dim("tokens", min=1, max=self.sequence_length)
        if self.objective == "scales":  # next-scale inputs: a vector per position
            example_tokens = torch.zeros(2, self.sequence_length, self.wte.in_features, device=self.null.device)
        else:
            example_tokens = torch.zeros(2, self.sequence_length - 1, dtype=torch.long, device=self.null.device)
        example = (self.null_prefix(2).detach().clone(), example_tokens)
        return Exported(self, example, ({0: batch}, {0: batch, 1: tokens}), ("forward",))

    def dynamic_step(self) -> Step:
        return Step(self, DynamicCache())

    def static_step(self, batch: int, device) -> Step:
        return Step(self, StaticCache(self.layers, batch, self.heads, self.prefix_tokens + self.sequence_length,
                                      self.width // self.heads, device, self.null.dtype))
