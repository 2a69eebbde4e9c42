"""Decoding strategies for the `ar` family: loops around one transformer step, and DECODERS,
the registry of their names (the CLI's --decode choices come from it).

Every strategy turns a condition prefix and per-token uniform noise into a grid of
image tokens, and counts its forward passes (what a speed-up must cut):

- `naive`:    recompute the whole sequence for every token (an LLM with no cache). T passes,
              each over a growing sequence: O(T^2) token computations.
- `kv`:       keep each layer's keys and values (a growing cache). T passes of one token.
- `static`:   the same with a cache allocated once at full length, updated in place and
              attended through a mask: every step has the same shapes, which is what
              torch.compile and CUDA graphs need (the LlamaGen / gpt-fast recipe). The
              step draws its token too (`SampledStep`: guidance, temperature, top-k and
              the inverse-CDF draw), so a compiled step is one program per token.
- `jacobi`:   speculative Jacobi decoding (Teng et al., ICLR 2025): all positions drafted
              at once, each pass checks the drafts left to right with the speculative
              sampling test, min(1, p/q), keeps the accepted run, and redrafts the rest.
              Training-free, and its samples follow the sequential distribution exactly.
- `parallel`: MaskGIT (Chang et al., CVPR 2022): a bidirectional transformer trained to
              fill masked tokens fixes the most confident ones each step, on a cosine
              schedule, in a fixed number of steps. Needs the `masked` objective.

Every strategy takes the same arguments (network, prefix, noise, options) and returns
(tokens, passes); `network` holds the transformer and the two kinds of pass it offers,
either of which an engine may have wrapped. A strategy's registry entry says which
training objective it needs and which of its passes has fixed shapes: that is all an
engine (compile, cudagraph) learns about it, through the generator (generator.py).
Adding a strategy means a function here and one registry entry.

Noise: three uniforms per token position, `u` (draws by inverse CDF), `r` (the Jacobi
acceptance test; MaskGIT's confidence noise) and `v` (Jacobi's draw from the residual
distribution after a rejection). Sequential decoders use `u` alone, so `naive`, `kv`
and `static` give the same tokens for the same noise.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from genfast.families.ar.model import ARNet, Step
from genfast.families.base import Exported


@dataclass
class Options:
    cfg: float = 1.0           # classifier-free guidance scale (1 = the conditional model alone)
    temperature: float = 1.0   # 0 = greedy
    top_k: int = 0             # 0 = the whole vocabulary
    parallel_steps: int = 8    # MaskGIT's number of steps
    jacobi_window: int = 16    # drafts checked per Jacobi pass


@dataclass
class Network:
    """What a strategy runs. `net` gives the conditioning and the sizes; `forward` is the
    full-sequence pass (prefix, tokens) -> logits at every position, and `static_step(rows,
    options)` the fixed-shape cached step that draws the next token, for a batch of `rows`:
    by default a fresh one, or an engine's compiled or recorded ones."""

    net: ARNet
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    static_step: Callable[[int, Options], SampledStep] | None = None

    def __post_init__(self):
        if self.forward is None:
            self.forward = self.net
        if self.static_step is None:
            self.static_step = lambda rows, options: SampledStep(self.net.static_step(rows, self.net.null.device),
                                                                 options)


def guided_probs(logits: torch.Tensor, options: Options, guided: bool) -> torch.Tensor:
    """Logits (2B or B, ..., V) -> probabilities (B, ..., V) in fp32: classifier-free
    guidance (the batch holds conditional rows then unconditional ones), temperature,
    top-k. Temperature 0 gives a one-hot on the argmax (greedy)."""
    logits = logits.float()
    if guided:
        half = logits.shape[0] // 2  # not chunk(2) or len(): they would fix the batch size of an export
        conditional, unconditional = logits[:half], logits[half:]
        logits = unconditional + options.cfg * (conditional - unconditional)
    if options.top_k:
        kth = logits.topk(min(options.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if options.temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return torch.softmax(logits / options.temperature, dim=-1)


def draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: the token whose cumulative probability first reaches u. The
    count of cumulative sums below u is that token's index (a sum of non-negative numbers
    never decreases, also in floating point), and unlike searchsorted it exports to ONNX."""
    cumulative = probs.cumsum(-1)
    below = cumulative < (uniforms * cumulative[..., -1]).unsqueeze(-1)
    return below.sum(-1).clamp_max(probs.shape[-1] - 1)


class SampledStep(nn.Module):
    """A static step and the draw of the token it predicts, in one call: (tokens (rows, 1),
    position (1,), uniforms (B,)) -> the next tokens (B,). Every tensor operation of a
    token, sampling included, is inside the one module an engine compiles or records, with
    no host synchronisation and no branch on tensor values (the options are constants of it)."""

    def __init__(self, step: Step, options: Options):
        super().__init__()
        self.step, self.options, self.guided = step, options, options.cfg != 1.0

    def prefill(self, prefix: torch.Tensor) -> torch.Tensor:
        return self.step.prefill(prefix)

    def forward(self, tokens: torch.Tensor, position: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        return draw(guided_probs(self.step(tokens, position), self.options, self.guided), uniforms)

    def exported(self) -> Exported:
        """This step as a pure function over its cache (PureStep), for an exporting engine:
        its cache's layers are the state, and a call's keys and values for its position are
        written into them (one slice copy each), so the prefill, which runs here, and the
        exported calls share the cache. One export serves every batch size."""
        net, cache = self.step.net, self.step.cache
        batch = torch.export.Dim("batch", min=1)
        rows = 2 * batch if self.guided else batch
        layer_shape = cache.keys.shape[2:]  # (heads, length, head dim)
        example_rows = 4 if self.guided else 2  # torch.export specialises on a batch of 1
        example = (torch.zeros(example_rows, 1, dtype=torch.long, device=cache.keys.device),
                   torch.tensor([net.prefix_tokens], device=cache.keys.device),
                   torch.full((2,), 0.5, device=cache.keys.device),
                   *[cache.keys.new_zeros(example_rows, *layer_shape) for _ in range(2 * net.layers)])

        def commit(inputs: tuple[torch.Tensor, ...], writes: tuple[torch.Tensor, ...]) -> None:
            # A slice's copy: index_copy_ took ~130 us a call at batch 64 (it indexes every row).
            position = int(inputs[1])
            cache.keys.narrow(3, position, 1).copy_(writes[0])
            cache.values.narrow(3, position, 1).copy_(writes[1])

        return Exported(PureStep(net, self.options), example, (*cache.keys.unbind(), *cache.values.unbind()), commit,
                        ({0: rows}, {}, {0: batch}, ({0: rows},) * (2 * net.layers)),  # *cache: one entry
                        ("step", dataclasses.astuple(self.options)))


class PureStep(nn.Module):
    """SampledStep's computation written for export, with no side effect: (tokens (rows,
    1), position (1,), uniforms (B,), *keys, *values (one (rows, heads, length, head dim)
    per layer)) -> (next tokens (B,), the position's keys and values (layers, rows, heads,
    1, head dim)). The same arithmetic as Block and Attention for one token, arranged for
    fewer ONNX nodes: 2-D activations (a Linear becomes one Gemm), heads split by one
    reshape (one token needs no transpose), and the new key and value attended beside the
    cache instead of written into a copy of it (a `where` over the whole cache cost 1.2 ms
    a layer at batch 64 in ONNX Runtime, more than the layer's matrix products). Only the
    cache's slots before the position are read (a slice whose length is the position's
    value, which torch.export keeps symbolic): no mask, and on average half the cache read
    that attending every slot costs, which is what batch 64's attention is bound by. The
    tests hold it to the eager static step's tokens."""

    def __init__(self, net: ARNet, options: Options):
        super().__init__()
        self.net, self.options, self.guided = net, options, options.cfg != 1.0

    def forward(self, tokens: torch.Tensor, position: torch.Tensor, uniforms: torch.Tensor, *cache: torch.Tensor):
        net, rows = self.net, tokens.shape[0]
        heads, head_dim = net.heads, net.width // net.heads
        keys, values = cache[:net.layers], cache[net.layers:]
        x = net.wte(tokens[:, 0]) + net.wpe(position)  # (rows, width)
        # The cache's slots before this token's (its own slot is not written yet): a prefix
        # of at least the condition's, read from the position (a host read, in export a size).
        written = position.item()
        torch._check(written >= net.prefix_tokens)
        torch._check(written < net.prefix_tokens + net.sequence_length)
        scale = head_dim ** -0.5
        new_keys, new_values = [], []
        for block, layer_keys, layer_values in zip(net.blocks, keys, values):
            layer_keys, layer_values = layer_keys[:, :, :written], layer_values[:, :, :written]
            qkv = block.attn.qkv(block.ln1(x)).view(rows, 3, heads, 1, head_dim)
            q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
            # Attention over [the cache before this token, this token]: the same weights as over
            # the cache with this token written into its slot, without copying the cache.
            scores = torch.cat([q @ layer_keys.transpose(-1, -2) * scale, (q * k).sum(-1, True) * scale], -1)
            weights = scores.softmax(-1)
            attended = weights[..., :-1] @ layer_values + weights[..., -1:] * v
            x = x + block.attn.proj(attended.reshape(rows, net.width))
            x = x + block.mlp(block.ln2(x))
            new_keys.append(k)
            new_values.append(v)
        probs = guided_probs(net.head(net.ln_f(x)), self.options, self.guided)
        return draw(probs, uniforms), torch.stack(new_keys), torch.stack(new_values)


class Decoder:
    """The shared set-up: the condition prefix (doubled with the null condition under
    guidance), the sequence length and the passes counter."""

    def __init__(self, net: ARNet, prefix: torch.Tensor, options: Options):
        self.options = options
        self.guided = options.cfg != 1.0
        self.prefix = torch.cat([prefix, net.null_prefix(len(prefix))]) if self.guided else prefix
        self.batch, self.length, self.passes = len(prefix), net.sequence_length, 0

    def rows(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.cat([tokens, tokens]) if self.guided else tokens

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        self.passes += 1
        return guided_probs(logits, self.options, self.guided)


def naive(network: Network, prefix: torch.Tensor, noise: torch.Tensor, options: Options) -> tuple[torch.Tensor, int]:
    d = Decoder(network.net, prefix, options)
    tokens = torch.zeros(d.batch, 0, dtype=torch.long, device=prefix.device)
    for i in range(d.length):
        logits = network.forward(d.prefix, d.rows(tokens))[:, -1]
        tokens = torch.cat([tokens, draw(d.probs(logits), noise[:, 0, i])[:, None]], 1)
    return tokens, d.passes


def kv(network: Network, prefix: torch.Tensor, noise: torch.Tensor, options: Options) -> tuple[torch.Tensor, int]:
    """The prefix in one pass (prefill), then one token a pass over a growing cache."""
    net, stepper = network.net, network.net.dynamic_step()
    d = Decoder(net, prefix, options)
    logits = stepper.prefill(d.prefix)
    positions = torch.arange(net.prefix_tokens, net.prefix_tokens + d.length, device=prefix.device)
    tokens = []
    for i in range(d.length):
        tokens.append(draw(d.probs(logits), noise[:, 0, i]))
        if i + 1 < d.length:
            logits = stepper(d.rows(tokens[-1][:, None]), positions[i:i + 1])
    return torch.stack(tokens, 1), d.passes


def static(network: Network, prefix: torch.Tensor, noise: torch.Tensor,
           options: Options) -> tuple[torch.Tensor, int]:
    """kv's loop over a StaticCache, each token drawn inside its step (possibly compiled or
    graph-captured): the prefill and its draw, then one call per token. Same tokens as kv."""
    d = Decoder(network.net, prefix, options)
    stepper = network.static_step(len(d.prefix), options)
    tokens = [draw(d.probs(stepper.prefill(d.prefix)), noise[:, 0, 0])]
    positions = torch.arange(network.net.prefix_tokens, network.net.prefix_tokens + d.length, device=prefix.device)
    for i in range(1, d.length):  # token i from token i - 1 at its position
        tokens.append(stepper(d.rows(tokens[-1][:, None]), positions[i - 1:i], noise[:, 0, i]))
    return torch.stack(tokens, 1), d.length  # one pass per token, the prefill included


def jacobi(network: Network, prefix: torch.Tensor, noise: torch.Tensor, options: Options) -> tuple[torch.Tensor, int]:
    """Speculative Jacobi decoding. Each pass runs the whole draft sequence; per row,
    drafts from the first unaccepted position on are tested left to right (at most
    `jacobi_window`): draft x ~ q is kept with probability min(1, p(x)/q(x)); the first
    rejected one is replaced by a draw from the residual max(p - q, 0) and ends the run.
    At least one token is settled per pass. Positions after the run are redrafted from
    the latest p, which becomes their q, through `couple`: a redraft keeps the old draft
    whenever the two distributions allow, so the context of later positions changes as
    little as it can and their drafts keep passing. The first drafts come from the
    uniform q."""
    net = network.net
    d = Decoder(net, prefix, options)
    batch, length, vocab = d.batch, d.length, net.vocab_size
    u, r, v = noise[:, 0], noise[:, 1], noise[:, 2]
    q = torch.full((batch, length, vocab), 1.0 / vocab, device=prefix.device)
    drafts = draw(q, u)
    accepted = torch.zeros(batch, dtype=torch.long, device=prefix.device)
    positions = torch.arange(length, device=prefix.device)
    while bool((accepted < length).any()):
        logits = network.forward(d.prefix, d.rows(drafts[:, :-1]))[:, net.prefix_tokens - 1:]
        p = d.probs(logits)  # (B, T, V): p[:, j] is the distribution of token j given the drafts before it
        ratio = p.gather(2, drafts[..., None]).squeeze(2) / q.gather(2, drafts[..., None]).squeeze(2)
        tested = (positions >= accepted[:, None]) & (positions < accepted[:, None] + options.jacobi_window)
        rejected = tested & ~(r < ratio)
        # Per row: the first rejected position, or the end of the window if all passed.
        first = torch.where(rejected.any(1), rejected.float().argmax(1),
                            (accepted + options.jacobi_window).clamp_max(length))
        at = first.clamp_max(length - 1)
        row = torch.arange(batch, device=prefix.device)
        rest = residual(p[row, at], q[row, at])
        replace = rejected.any(1)
        drafts[row[replace], at[replace]] = draw(rest[replace], v[row[replace], at[replace]])
        settled = torch.where(replace, first + 1, first)
        redraft = positions >= settled[:, None]
        drafts = torch.where(redraft, couple(drafts, q, p, *pass_uniforms(u, d.passes)), drafts)
        q = torch.where(redraft[..., None], p, q)
        accepted = torch.maximum(accepted, settled)
    return drafts, d.passes


def couple(drafts: torch.Tensor, q: torch.Tensor, p: torch.Tensor, keep: torch.Tensor,
           fresh: torch.Tensor) -> torch.Tensor:
    """Maximal coupling (as in MC-SJD, Lee et al. 2025): redraft tokens x ~ q as tokens ~ p
    that equal x as often as any redraft can, 1 - TV(p, q) of the time. x is kept with
    probability min(1, p(x)/q(x)) (uniforms `keep`), else replaced by a draw from the
    residual max(p - q, 0) (uniforms `fresh`). The result follows p exactly whenever
    x ~ q and the uniforms are new, which is what keeps Jacobi exact. Drawing every
    redraft afresh by inverse CDF agreed far less often (the measured passes are in
    BENCHMARKS.md)."""
    kept = keep * q.gather(-1, drafts[..., None]).squeeze(-1) < p.gather(-1, drafts[..., None]).squeeze(-1)
    return torch.where(kept, drafts, draw(residual(p, q), fresh))


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """max(p - q, 0), what p has beyond q (draw normalises it); p itself where q covers it all."""
    rest = (p - q).clamp_min(0)
    return torch.where(rest.sum(-1, keepdim=True) > 0, rest, p)


def pass_uniforms(u: torch.Tensor, counter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two sets of uniforms per position, new for every pass and reproducible from the
    noise: a counter-based generator (Wellons' lowbias32 integer hash) of the bits of the
    position's u, the pass number and a stream number. Reusing one uniform across passes
    instead would tie a redraft to the earlier coupling tests at its position and bias it."""
    bits = u.float().contiguous().view(torch.int32).long() & 0xFFFFFFFF
    streams = []
    for stream in (1, 2):
        x = bits ^ ((counter * 0x9E3779B9 + stream * 0x85EBCA6B) & 0xFFFFFFFF)
        x = x ^ (x >> 16)
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x = x ^ (x >> 15)
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        x = x ^ (x >> 16)
        streams.append(((x.double() + 0.5) / 2 ** 32).float())
    return streams[0], streams[1]


def parallel(network: Network, prefix: torch.Tensor, noise: torch.Tensor,
             options: Options) -> tuple[torch.Tensor, int]:
    """MaskGIT decoding: every step predicts all masked tokens at once and fixes the most
    confident, leaving T * cos(pi/2 * step/steps) masked; confidence is the token's log
    probability plus Gumbel noise annealed to zero (Chang et al.'s choice-temperature)."""
    net = network.net
    d = Decoder(net, prefix, options)
    batch, length, steps = d.batch, d.length, options.parallel_steps
    tokens = torch.full((batch, length), net.mask_token, dtype=torch.long, device=prefix.device)
    masked = torch.ones(batch, length, dtype=torch.bool, device=prefix.device)
    gumbel = -torch.log(-torch.log(noise[:, 1].clamp(1e-10, 1 - 1e-7)))
    for step in range(steps):
        logits = network.forward(d.prefix, d.rows(tokens))[:, net.prefix_tokens:]
        p = d.probs(logits)
        sampled = draw(p, noise[:, 0])
        confidence = p.gather(2, sampled[..., None]).squeeze(2).clamp_min(1e-30).log()
        confidence = confidence + 4.5 * (1 - (step + 1) / steps) * gumbel
        confidence = confidence.masked_fill(~masked, math.inf)  # fixed tokens stay fixed
        remaining = int(masked[0].sum())
        keep_masked = 0 if step == steps - 1 else min(remaining - 1,
                                                      math.floor(length * math.cos(math.pi / 2 * (step + 1) / steps)))
        keep_masked = max(keep_masked, 0)
        order = confidence.argsort(1)  # least confident first
        still = torch.zeros_like(masked).scatter(1, order[:, :keep_masked], True) & masked
        newly = masked & ~still
        tokens = torch.where(newly, sampled, tokens)
        masked = still
    return tokens, d.passes


@dataclass(frozen=True)
class Strategy:
    """A registry entry: the loop, what it needs, and which of its passes has fixed shapes."""

    run: Callable[[Network, torch.Tensor, torch.Tensor, Options], tuple[torch.Tensor, int]]
    objective: str             # the training objective it decodes: "causal" or "masked"
    fixed: str | None          # its fixed-shape pass: "step" (static_step), "forward", or None (inputs grow)
    summary: str               # one line for --help
    recordable: bool = False   # the whole decode has one length and never reads a tensor's value on the host


DECODERS: dict[str, Strategy] = {
    "naive": Strategy(naive, "causal", None, "the whole sequence again for every token"),
    "kv": Strategy(kv, "causal", None, "one token a pass over a growing key/value cache"),
    "static": Strategy(static, "causal", "step", "kv over a cache of fixed size: compile and onnx wrap its step, "
                       "cudagraph records all of it", recordable=True),
    "jacobi": Strategy(jacobi, "causal", "forward", "speculative Jacobi: all tokens drafted, checked, redrafted"),
    "parallel": Strategy(parallel, "masked", "forward", "MaskGIT: the most confident masked tokens fixed per step"),
}


def fitting(objective: str) -> list[str]:
    """The strategies that decode a model trained with `objective`."""
    return [name for name, strategy in DECODERS.items() if strategy.objective == objective]
