"""LLM image generation: a GPT over VQ-VAE image tokens, conditioned on a class or a text prompt.

Stage one is the VQ-VAE tokenizer (vqvae.py), trained on its own; stage two, this
family, trains a decoder-only transformer (nanoGPT's block: pre-LayerNorm,
multi-head attention through scaled_dot_product_attention, a 4x GELU MLP) on the
tokenizer's 7x7 grids read row by row, after a prefix that carries the condition:
- a class: a learned embedding per class;
- a text prompt: its all-MiniLM-L6-v2 sentence embedding (text.py), projected into
  the prefix; trained on several phrasings per class, so held-out phrasings work
  through the language model;
- nothing: a learned null prefix. The condition is replaced by it at random in
  training (`p_uncond`), which is what classifier-free guidance (`cfg`) needs.

Two objectives: `causal` (next-token prediction: the naive, kv, static and jacobi
decoders) and `masked` (MaskGIT: bidirectional attention, a cosine-scheduled
fraction of tokens replaced by a mask token and predicted: the parallel decoder).

The checkpoint holds the tokenizer too, so it samples with nothing else; a text
model also holds the embeddings of its training captions (a class then stands for
the mean of its phrasings), and needs MiniLM only for new prompts.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from genfast import config as configlib
from genfast.config import require
from genfast.distributed import unwrap
from genfast.errors import GenfastError
from genfast.families import decoding
from genfast.families.base import Sampler, TrainedConfig
from genfast.families.vqvae import VQVAEConfig, VQVAENet


@dataclass
class ARConfig(TrainedConfig):
    tokenizer: str = ""          # VQ-VAE checkpoint or shipped name (default: the shipped vqvae-<data set>)
    tokenizer_config: str = ""   # that tokenizer's config as JSON: filled in when training starts
    text: bool = False           # condition on text prompts (MiniLM) rather than class labels
    phrasings: int = 0           # training captions per class (text models): filled in when training starts
    objective: str = "causal"    # causal (GPT) | masked (MaskGIT)
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
    jacobi_window: int = 16


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

    def forward(self, x: torch.Tensor, cache=None, layer: int = 0, positions: torch.Tensor | None = None):
        batch, n, width = x.shape
        q, k, v = (t.view(batch, n, self.heads, -1).transpose(1, 2) for t in self.qkv(x).split(width, dim=2))
        dropout = self.dropout if self.training else 0.0
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=self.causal)
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

    def forward(self, x, cache=None, layer=0, positions=None):
        x = x + self.attn(self.ln1(x), cache, layer, positions)
        return x + self.mlp(self.ln2(x))


class DynamicCache:
    """Keys and values of every position so far, grown by concatenation (`kv`)."""

    def __init__(self):
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def update(self, layer, k, v, positions):
        if layer in self.keys:
            k, v = torch.cat([self.keys[layer], k], 2), torch.cat([self.values[layer], v], 2)
        self.keys[layer], self.values[layer] = k, v
        return k, v, torch.arange(k.shape[2], device=k.device)[None] <= positions[:, None]


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

    def __init__(self, net: "ARNet", cache: DynamicCache | StaticCache):
        super().__init__()
        self.net, self.cache = net, cache

    def prefill(self, prefix: torch.Tensor) -> torch.Tensor:
        return self.net.step(prefix, self.cache, torch.arange(prefix.shape[1], device=prefix.device))[:, -1]

    def forward(self, tokens: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        return self.net.step(self.net.wte(tokens), self.cache, position)[:, -1]


class ARNet(nn.Module):
    """The transformer and its conditioning: (prefix, tokens) -> next-token logits."""

    def __init__(self, c: ARConfig, vocab_size: int, grid_tokens: int):
        super().__init__()
        self.vocab_size, self.sequence_length, self.prefix_tokens = vocab_size, grid_tokens, c.prefix_tokens
        self.mask_token = vocab_size  # an extra embedding row (masked objective)
        self.objective = c.objective
        self.text, self.conditional, self.num_classes = c.text, c.conditional or c.text, c.num_classes
        self.width, self.heads, self.layers = c.n_embd, c.n_head, c.n_layer
        self.wte = nn.Embedding(vocab_size + 1, c.n_embd)
        self.wpe = nn.Embedding(c.prefix_tokens + grid_tokens, c.n_embd)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd)
        self.head = nn.Linear(c.n_embd, vocab_size, bias=False)
        prefix_width = c.prefix_tokens * c.n_embd
        self.null = nn.Parameter(torch.zeros(prefix_width))
        if c.text:
            from genfast.text import EMBEDDING_DIM

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
        """Logits at every position of [prefix, tokens] (no cache)."""
        x = torch.cat([prefix, self.wte(tokens)], 1)
        x = self.drop(x + self.wpe(torch.arange(x.shape[1], device=x.device)))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def step(self, x: torch.Tensor, cache, positions: torch.Tensor) -> torch.Tensor:
        """Logits of new positions (embeddings x at `positions`), reading and extending `cache`."""
        x = x + self.wpe(positions)
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer, positions)
        return self.head(self.ln_f(x))

    def dynamic_step(self) -> Step:
        return Step(self, DynamicCache())

    def static_step(self, batch: int, device) -> Step:
        return Step(self, StaticCache(self.layers, batch, self.heads, self.prefix_tokens + self.sequence_length,
                                      self.width // self.heads, device, self.null.dtype))


class ARGenerator(nn.Module):
    """What an `ar` sampler runs: noise (B, 3, T) and a condition -> pixels, through a
    decoding strategy and the tokenizer's decoder. `passes` is the last call's count of
    forward passes (per image: every row of the batch takes them together).

    The compile and cudagraph engines set `step_wrap`, which wraps the static decoder's
    fixed-shape step (one wrapped step is kept per batch size, so compiling or recording
    happens once per size, and its cache buffers are reused), or `compiled_net`, the
    transformer compiled for the full-sequence passes of jacobi and parallel."""

    one_call = False  # a loop of data-dependent length: engines that trace one call do not apply

    def __init__(self, tokenizer: VQVAENet, net: ARNet, decode: str, options: decoding.Options,
                 step_wrap: Callable[[Step], Callable] | None = None, compiled_net: nn.Module | None = None):
        super().__init__()
        self.tokenizer, self.net = tokenizer, net
        self.decode, self.options, self.passes = decode, options, 0
        self.step_wrap, self.steps = step_wrap, {}
        self.compiled_net = compiled_net

    def __getstate__(self):
        # The per-batch steps are a cache (of compiled code and cache buffers): a copy
        # (bf16's deepcopy) starts without them and builds its own.
        return self.__dict__ | {"steps": {}}

    def with_step_wrap(self, wrap: Callable[[Step], Callable]) -> "ARGenerator":
        """The same model and options, its static decoder's step run through `wrap`."""
        return ARGenerator(self.tokenizer, self.net, self.decode, self.options, step_wrap=wrap)

    def with_compiled_net(self, compiled: nn.Module) -> "ARGenerator":
        """The same model and options, full-sequence passes through `compiled` (which
        forwards attribute access to the net, as torch.compile's wrapper does)."""
        return ARGenerator(self.tokenizer, self.net, self.decode, self.options, compiled_net=compiled)

    def static_step(self, rows: int):
        if rows not in self.steps:
            step = self.net.static_step(rows, self.net.null.device)
            self.steps[rows] = _Wrapped(step, self.step_wrap(step)) if self.step_wrap else step
        return self.steps[rows]

    def tokens(self, noise: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        uniforms = torch.special.ndtr(noise.float())  # Gaussian noise -> uniforms, one set per position
        prefix = self.net.prefix(condition) if condition is not None else self.net.null_prefix(len(noise))
        net = self.net if self.compiled_net is None else self.compiled_net
        tokens, self.passes = decoding.DECODERS[self.decode](net, prefix, uniforms, self.options, self.static_step)
        return tokens

    def forward(self, noise: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        return self.tokenizer.decode(self.tokens(noise, condition))


class _Wrapped:
    """A static step whose token steps run through an engine's wrapper; the prefill (one
    pass of another shape) runs as it is, on the same cache."""

    def __init__(self, step: Step, run: Callable):
        self.step, self.run = step, run

    def prefill(self, prefix: torch.Tensor) -> torch.Tensor:
        return self.step.prefill(prefix)

    def __call__(self, tokens: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        return self.run(tokens, position)


def tokenizer_config(config: ARConfig) -> VQVAEConfig:
    if not config.tokenizer_config:
        raise GenfastError("this ar config names no tokenizer; it is filled in when training starts")
    return configlib.from_dict(VQVAEConfig, json.loads(config.tokenizer_config))


class AR:
    name = "ar"
    config_class = ARConfig
    presets = PRESETS
    generative = True
    optimizer_keys = ("lr", "weight_decay", "beta1", "beta2", "warmup_steps")
    sampling_keys = ("decode", "cfg", "temperature", "top_k", "parallel_steps", "jacobi_window")

    def model_name(self, config: ARConfig) -> str:
        base = "maskgit" if config.objective == "masked" else "ar"
        return f"{base}-text" if config.text else base

    def prepare(self, config: ARConfig, train_set) -> tuple[ARConfig, dict[str, dict[str, torch.Tensor]]]:
        """Before a new run: the tokenizer it builds on (config and weights), and for a text
        model the MiniLM embeddings of its training captions."""
        from genfast import checkpoint, pretrained, text

        name = config.tokenizer or f"vqvae-{train_set.name}"
        try:
            tokenizer = checkpoint.load(pretrained.resolve(name))
        except GenfastError as e:
            raise GenfastError(f"ar trains on a VQ-VAE's tokens and found none ({e}); train one with "
                               f"'genfast train vqvae --data {train_set.name} --out DIR' and pass "
                               "tokenizer=DIR/checkpoint.safetensors") from None
        if tokenizer.family != "vqvae":
            raise GenfastError(f"tokenizer {name} is a '{tokenizer.family}' checkpoint, not a vqvae")
        shape = [tokenizer.config["channels"], tokenizer.config["image_size"], tokenizer.config["image_size"]]
        if shape != list(train_set.image_shape):
            raise GenfastError(f"tokenizer {name} encodes {shape} images, but the data set has "
                               f"{list(train_set.image_shape)}; train a tokenizer on this data set")
        changes: dict[str, Any] = {"tokenizer": str(name), "tokenizer_config": json.dumps(tokenizer.config),
                                   "conditional": config.conditional or config.text}
        initial = {"tokenizer": {k: v.float() for k, v in tokenizer.modules["vqvae"].items()}}
        if config.text:
            phrasings = text.captions(train_set.name, train_set.class_names)
            count = min(len(p) for p in phrasings)
            embedded = text.encoder()([p for per_class in phrasings for p in per_class[:count]])
            changes["phrasings"] = count
            initial["gpt"] = {"captions": embedded.view(len(phrasings), count, -1)}
        return configlib.override(config, changes), initial

    def build(self, config: ARConfig) -> dict[str, nn.Module]:
        require(config, positive=("n_layer", "n_head", "n_embd", "prefix_tokens", "batch_size", "lr"),
                non_negative=("weight_decay", "warmup_steps"), unit=("dropout", "p_uncond", "beta1", "beta2"))
        if config.objective not in ("causal", "masked"):
            raise GenfastError(f"objective must be 'causal' or 'masked', got '{config.objective}'")
        if config.n_embd % config.n_head:
            raise GenfastError(f"n_embd ({config.n_embd}) must be a multiple of n_head ({config.n_head})")
        if (config.conditional or config.text) and config.num_classes < 2:
            raise GenfastError("a conditional ar model needs a labelled data set with at least 2 classes")
        self.check_sampling(config)
        vq = tokenizer_config(config)
        tokenizer = VQVAENet(vq).requires_grad_(False)
        return {"tokenizer": tokenizer, "gpt": ARNet(config, vq.codebook_size, (vq.image_size // 4) ** 2)}

    def optimizers(self, modules: dict[str, nn.Module], config: ARConfig) -> dict[str, torch.optim.Optimizer]:
        # nanoGPT's split: weight decay on weight matrices and embeddings, none on biases,
        # norms and position embeddings.
        decay = [p for n, p in modules["gpt"].named_parameters() if p.dim() >= 2 and "wpe" not in n]
        rest = [p for n, p in modules["gpt"].named_parameters() if not (p.dim() >= 2 and "wpe" not in n)]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                       {"params": rest, "weight_decay": 0.0}],
                                      lr=config.lr, betas=(config.beta1, config.beta2))
        return {"gpt": optimizer}

    def train_step(self, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                   images: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator,
                   config: ARConfig) -> dict[str, float]:
        # The forward pass goes through modules["gpt"] (DDP when several processes train);
        # the network's own methods through `net`.
        net, optimizer = unwrap(modules["gpt"]), optimizers["gpt"]
        with torch.no_grad():
            tokens = modules["tokenizer"].eval().encode(images)
        batch, length = tokens.shape
        device = tokens.device
        condition = None
        if net.conditional:
            dropped = torch.rand(batch, generator=generator, device=generator.device).to(device) < config.p_uncond
            if config.text:  # a random phrasing of each image's class
                pick = torch.randint(config.phrasings, (batch,), generator=generator, device=generator.device)
                condition = net.captions[labels, pick.to(device)]
                condition = condition.masked_fill(dropped[:, None], 0.0)
            else:
                condition = labels.masked_fill(dropped, -1)
        prefix = net.prefix(condition) if condition is not None else net.null_prefix(batch)
        if config.objective == "causal":
            logits = modules["gpt"](prefix, tokens[:, :-1])[:, config.prefix_tokens - 1:]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))
        else:  # MaskGIT: mask a cosine-scheduled fraction, predict the masked tokens
            ratio = torch.cos(math.pi / 2 * torch.rand(batch, generator=generator, device=generator.device)).to(device)
            count = (ratio * length).ceil().clamp(1, length)
            scores = torch.rand(batch, length, generator=generator, device=generator.device).to(device)
            masked = scores.argsort(1).argsort(1) < count[:, None]
            logits = modules["gpt"](prefix, tokens.masked_fill(masked, net.mask_token))[:, config.prefix_tokens:]
            loss = F.cross_entropy(logits[masked], tokens[masked])
        step = optimizer.state[next(iter(net.parameters()))].get("step", 0)
        for group in optimizer.param_groups:  # linear warm-up, then constant
            group["lr"] = config.lr * min(1.0, (float(step) + 1) / max(1, config.warmup_steps))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        return {"loss": loss.item(), "bits_per_token": loss.item() / math.log(2)}

    def sampler(self, modules: dict[str, nn.Module], config: ARConfig, class_names: tuple[str, ...]) -> Sampler:
        return Sampler.from_module(
            ARGenerator(modules["tokenizer"], modules["gpt"], config.decode, options_of(config)),
            noise_shape=(3, modules["gpt"].sequence_length),
            image_shape=(tokenizer_config(config).channels, config.image_size, config.image_size),
            class_names=class_names if (config.conditional or config.text) else ())

    def check_sampling(self, config: ARConfig) -> None:
        require(config, positive=("parallel_steps", "jacobi_window"), non_negative=("temperature", "top_k", "cfg"))
        check_decode(config.objective, config.decode)

    def inference_modules(self) -> tuple[str, ...]:
        return ("tokenizer", "gpt")


def prompt_condition(sampler: Sampler, prompt: str, n: int) -> torch.Tensor:
    """The condition that makes n images of `prompt` (an empty prompt: unconditional)."""
    net = getattr(sampler.module, "net", None)
    if not getattr(net, "text", False):
        raise GenfastError("--prompt needs a text-conditioned ar model (ar-text-...); this one is not")
    from genfast.text import EMBEDDING_DIM, encoder

    embedding = encoder()([prompt]) if prompt.strip() else torch.zeros(1, EMBEDDING_DIM)
    return embedding.expand(n, -1)


def options_of(config: ARConfig) -> decoding.Options:
    return decoding.Options(cfg=config.cfg, temperature=config.temperature, top_k=config.top_k,
                            parallel_steps=config.parallel_steps, jacobi_window=config.jacobi_window)


def check_decode(objective: str, decode: str) -> None:
    allowed = decoding.CAUSAL if objective == "causal" else ("parallel",)
    if decode not in allowed:
        raise GenfastError(f"decode '{decode}' does not fit this {objective} model; choose one of: "
                           f"{', '.join(allowed)}")


def with_decoding(sampler: Sampler, decode: str | None = None, **options) -> Sampler:
    """A copy of an ar sampler that decodes with `decode` and the given options (cfg,
    temperature, top_k, parallel_steps, jacobi_window); the weights are shared."""
    generator: ARGenerator = sampler.module
    decode = decode or generator.decode
    check_decode(generator.net.objective, decode)
    fresh = ARGenerator(generator.tokenizer, generator.net, decode,
                        dataclasses.replace(generator.options, **{k: v for k, v in options.items() if v is not None}))
    copy = Sampler.from_module(fresh, sampler.noise_shape, sampler.image_shape, sampler.class_names)
    return dataclasses.replace(copy, info=sampler.info | {"decode": decode})
