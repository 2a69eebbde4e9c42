"""The `ar` family: LLM image generation, a GPT over VQ-VAE image tokens, conditioned on a class
or a text prompt.

Stage one is the VQ-VAE tokenizer (tokenizer.py, its own family `vqvae`), trained on
its own; stage two, this family, trains a decoder-only transformer (model.py) on the
tokenizer's 7x7 grids read row by row, after a prefix that carries the condition:
- a class: a learned embedding per class;
- a text prompt: its all-MiniLM-L6-v2 sentence embedding (text.py), projected into
  the prefix; trained on the caption corpus (corpus.py: each image's own captions,
  from its label and measured attributes, in thousands of phrasings per class), so
  phrasings and attribute words it never saw work through the language model;
- nothing: a learned null prefix. The condition is replaced by it at random in
  training (`p_uncond`), which is what classifier-free guidance (`cfg`) needs.

Three objectives (OBJECTIVES): `causal` (next-token prediction: the naive, kv, static
and jacobi decoders), `masked` (MaskGIT: bidirectional attention, a cosine-scheduled
fraction of tokens replaced by a mask token and predicted: the parallel decoder) and
`scales` (VAR's next-scale prediction over a multi-scale tokenizer: every scale's
tokens from the true coarser ones, block-causal, in one pass: the scales decoders).
The decoders (decoders.py) run inside the sampler's network (generator.py).

The checkpoint holds the tokenizer too, so it samples with nothing else; a text
model also holds the embeddings of each class's plain training phrasings (a class
index then stands for their mean), and needs MiniLM only for new prompts.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from genfast import checkpoint, corpus
from genfast import config as configlib
from genfast.config import require
from genfast.distributed import unwrap
from genfast.errors import GenfastError
from genfast.families.ar import decoders, text
from genfast.families.ar.generator import ARGenerator, check_decode
from genfast.families.ar.model import PRESETS, ARConfig, ARNet
from genfast.families.ar.tokenizer import VQVAEConfig, VQVAENet
from genfast.families.base import Family, Sampler, check_bounds


def tokenizer_config(config: ARConfig) -> VQVAEConfig:
    """The tokenizer's config, which the ar config carries as JSON (checked like any header)."""
    if not config.tokenizer_config:
        raise GenfastError("this ar config names no tokenizer; it is filled in when training starts")
    try:
        values = json.loads(config.tokenizer_config)
    except ValueError:
        values = None
    if not isinstance(values, dict):
        raise GenfastError("this ar model's tokenizer_config is damaged (not a JSON object); the file is damaged "
                           "or was edited")
    vq = configlib.from_dict(VQVAEConfig, values)
    check_bounds(vq, "tokenizer config")
    return vq


# An objective's loss: (gpt: the network as trained, DDP or not; the tokenizer; net: the bare
# network; the condition prefix; the images' tokens; the run's generator) -> the loss.
Loss = Callable[[nn.Module, VQVAENet, ARNet, torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]


def next_token_loss(gpt: nn.Module, tokenizer: VQVAENet, net: ARNet, prefix: torch.Tensor, tokens: torch.Tensor,
                    generator: torch.Generator) -> torch.Tensor:
    """GPT: every token predicted from the condition and the tokens before it."""
    logits = gpt(prefix, tokens[:, :-1])[:, net.prefix_tokens - 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))


def masked_token_loss(gpt: nn.Module, tokenizer: VQVAENet, net: ARNet, prefix: torch.Tensor, tokens: torch.Tensor,
                      generator: torch.Generator) -> torch.Tensor:
    """MaskGIT: mask a cosine-scheduled fraction, predict the masked tokens."""
    batch, length = tokens.shape
    device = tokens.device
    ratio = torch.cos(math.pi / 2 * torch.rand(batch, generator=generator, device=generator.device)).to(device)
    count = (ratio * length).ceil().clamp(1, length)
    scores = torch.rand(batch, length, generator=generator, device=generator.device).to(device)
    masked = scores.argsort(1).argsort(1) < count[:, None]
    logits = gpt(prefix, tokens.masked_fill(masked, net.mask_token))[:, net.prefix_tokens:]
    return F.cross_entropy(logits[masked], tokens[masked])


def next_scale_loss(gpt: nn.Module, tokenizer: VQVAENet, net: ARNet, prefix: torch.Tensor, tokens: torch.Tensor,
                    generator: torch.Generator) -> torch.Tensor:
    """VAR's teacher forcing: every scale predicted from the true coarser ones, all in one pass."""
    with torch.no_grad():
        inputs = tokenizer.next_scale_inputs(tokens)
    logits = gpt(prefix, inputs)[:, net.prefix_tokens:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))


@dataclass(frozen=True)
class Objective:
    """A registry entry: how a model of this training objective is called, what it builds on
    and its loss. The decoders that fit it say so themselves (decoders.DECODERS)."""

    name: str               # the model's name for people ("-text" added for a text model)
    tokenizer: str          # the shipped tokenizer it builds on unless told: <tokenizer>-<data set>
    loss: Loss
    multi_scale: bool = False  # needs a multi-scale tokenizer (tokenizer.py, `scales`)


OBJECTIVES: dict[str, Objective] = {
    "causal": Objective("ar", "vqvae", next_token_loss),
    "masked": Objective("maskgit", "vqvae", masked_token_loss),
    "scales": Objective("var", "vqvae-multiscale", next_scale_loss, multi_scale=True),
}


def objective_of(config: ARConfig) -> Objective:
    if config.objective not in OBJECTIVES:
        raise GenfastError(f"objective must be one of {', '.join(OBJECTIVES)}, got '{config.objective}'")
    return OBJECTIVES[config.objective]


class AR(Family):
    name = "ar"
    config_class = ARConfig
    presets = PRESETS
    generative = True
    optimizer_keys = ("lr", "weight_decay", "beta1", "beta2")
    sampling_keys = ("decode", "cfg", "temperature", "top_k", "parallel_steps", "choice_temperature", "jacobi_window",
                     "cfg_schedule", "last_scale_temperature")

    def model_name(self, config: ARConfig) -> str:
        base = objective_of(config).name
        return f"{base}-text" if config.text else base

    def prepare(self, config: ARConfig, train_set) -> tuple[ARConfig, dict[str, dict[str, torch.Tensor]]]:
        """Before a new run: the tokenizer it builds on (config and weights), and for a text
        model the MiniLM embeddings of the phrasings a class index stands for."""
        name = config.tokenizer or f"{objective_of(config).tokenizer}-{train_set.name}"
        tokenizer = checkpoint.load_part(name, "vqvae", "tokenizer", train_set)
        changes: dict[str, Any] = {"tokenizer": str(name), "tokenizer_config": json.dumps(tokenizer.config),
                                   "conditional": config.conditional or config.text}
        initial = {"tokenizer": {k: v.float() for k, v in tokenizer.modules["vqvae"].items()}}
        if config.text:
            if config.captions == "corpus" and not corpus.covers(train_set.name, train_set.class_names):
                changes["captions"] = "classes"  # no corpus speaks of it: its class names, phrased a few ways
            phrasings = text.class_phrasings(train_set.name, train_set.class_names,
                                             changes.get("captions", config.captions))
            count = min(len(p) for p in phrasings)
            embedded = text.encoder()([p for per_class in phrasings for p in per_class[:count]])
            changes["phrasings"] = count
            initial["gpt"] = {"captions": embedded.view(len(phrasings), count, -1)}
        return configlib.override(config, changes), initial

    def start_run(self, modules: dict[str, nn.Module], config: ARConfig, train_set, seed: int) -> None:
        """A text model trained on the corpus: its CaptionPool (text.py), drawn from the run's seed,
        so that a resumed run trains on the same captions."""
        if config.text and config.captions == "corpus":
            net = modules["gpt"]
            net.caption_pool = text.CaptionPool.build(train_set.name, train_set.class_names, train_set.images,
                                                      train_set.labels, config.caption_pool, seed).to(net.null.device)

    def build(self, config: ARConfig) -> dict[str, nn.Module]:
        require(config, positive=("n_layer", "n_head", "n_embd", "prefix_tokens", "batch_size", "lr",
                                  "caption_pool"),
                non_negative=("weight_decay",), unit=("dropout", "p_uncond", "beta1", "beta2"))
        objective = objective_of(config)
        if config.captions not in text.CAPTION_SOURCES:
            raise GenfastError(f"captions must be one of {', '.join(text.CAPTION_SOURCES)}, got '{config.captions}'")
        if config.n_embd % config.n_head:
            raise GenfastError(f"n_embd ({config.n_embd}) must be a multiple of n_head ({config.n_head})")
        if (config.conditional or config.text) and config.num_classes < 2:
            raise GenfastError("a conditional ar model needs a labelled data set with at least 2 classes")
        self.check_sampling(config)
        vq = tokenizer_config(config)
        if objective.multi_scale and not vq.scales:
            raise GenfastError(f"objective={config.objective} predicts a multi-scale tokenizer's scales, and "
                               f"tokenizer {config.tokenizer} has one scale; train one with 'genfast train vqvae "
                               "scales=1,2,3,5,7 ...' and pass tokenizer=DIR/checkpoint.safetensors")
        tokenizer = VQVAENet(vq).requires_grad_(False)
        gpt = ARNet(config, vq.codebook_size, tokenizer.tokens_per_image, tokenizer.sides, vq.code_dim)
        return {"tokenizer": tokenizer, "gpt": gpt}

    def optimizers(self, modules: dict[str, nn.Module], config: ARConfig) -> dict[str, torch.optim.Optimizer]:
        # nanoGPT's split: weight decay on weight matrices and embeddings, none on biases,
        # norms and position (and scale) embeddings.
        def decays(name: str, p: torch.Tensor) -> bool:
            return p.dim() >= 2 and "wpe" not in name and "scale_embedding" not in name

        decay = [p for n, p in modules["gpt"].named_parameters() if decays(n, p)]
        rest = [p for n, p in modules["gpt"].named_parameters() if not decays(n, p)]
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
        tokenizer = modules["tokenizer"].eval()
        with torch.no_grad():
            tokens = tokenizer.encode(images)
        batch, device = len(tokens), tokens.device
        condition = None
        if net.conditional:
            dropped = torch.rand(batch, generator=generator, device=generator.device).to(device) < config.p_uncond
            if config.text and config.captions == "corpus":  # a caption of each image's class and look
                condition = net.caption_pool.draw(images, labels, generator).masked_fill(dropped[:, None], 0.0)
            elif config.text:  # a random phrasing of each image's class
                pick = torch.randint(config.phrasings, (batch,), generator=generator, device=generator.device)
                condition = net.captions[labels, pick.to(device)]
                condition = condition.masked_fill(dropped[:, None], 0.0)
            else:
                condition = labels.masked_fill(dropped, -1)
        prefix = net.prefix(condition) if condition is not None else net.null_prefix(batch)
        loss = objective_of(config).loss(modules["gpt"], tokenizer, net, prefix, tokens, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        return {"loss": loss.item(), "bits_per_token": loss.item() / math.log(2)}

    def sampler(self, modules: dict[str, nn.Module], config: ARConfig, class_names: tuple[str, ...]) -> Sampler:
        sampler = Sampler.from_module(
            ARGenerator(modules["tokenizer"], modules["gpt"], config.decode, options_of(config)),
            noise_shape=(3, modules["gpt"].sequence_length),
            image_shape=(tokenizer_config(config).channels, config.image_size, config.image_size),
            class_names=class_names if (config.conditional or config.text) else ())
        return dataclasses.replace(sampler, encode_prompt=encode_prompt) if config.text else sampler

    def check_sampling(self, config: ARConfig) -> None:
        require(config, positive=("parallel_steps", "jacobi_window"),
                non_negative=("temperature", "top_k", "cfg", "choice_temperature"))
        check_decode(config.objective, config.decode)
        if config.cfg_schedule not in decoders.CFG_SCHEDULES:
            raise GenfastError(f"cfg_schedule must be one of {', '.join(decoders.CFG_SCHEDULES)}, got "
                               f"'{config.cfg_schedule}'")
        last = config.last_scale_temperature
        if last is not None and not (math.isfinite(last) and last >= 0):
            raise GenfastError(f"config key 'last_scale_temperature' must be >= 0 (or unset), got {last!r}")
        scale_only = [key for key, unset in (("cfg_schedule", "constant"), ("last_scale_temperature", None))
                      if getattr(config, key) != unset]
        if scale_only and config.objective != "scales":
            raise GenfastError(f"{' and '.join(scale_only)} set how next-scale models (objective=scales) draw "
                               f"their scales; this model's objective is {config.objective}: drop them")

    def inference_modules(self) -> tuple[str, ...]:
        return ("tokenizer", "gpt")

    def describe(self, config: ARConfig, test: dict[str, float]) -> str:
        return "text prompts" if config.text else super().describe(config, test)


def encode_prompt(prompt: str) -> torch.Tensor:
    """A prompt's (1, 384) condition row: its MiniLM embedding, or zeros (the null
    condition) for an empty prompt, which needs no language model."""
    return text.encoder()([prompt]) if prompt.strip() else torch.zeros(1, text.EMBEDDING_DIM)


def options_of(config: ARConfig) -> decoders.Options:
    return decoders.Options(cfg=config.cfg, temperature=config.temperature, top_k=config.top_k,
                            parallel_steps=config.parallel_steps, choice_temperature=config.choice_temperature,
                            jacobi_window=config.jacobi_window, cfg_schedule=config.cfg_schedule,
                            last_scale_temperature=config.last_scale_temperature)
