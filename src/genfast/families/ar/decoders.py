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
              For export, the whole decode is offered as the chained calls of one pure
              function (`static_loop`), which onnx replays with no copy between calls.
- `jacobi`:   speculative Jacobi decoding (Teng et al., ICLR 2025): all positions drafted
              at once, each pass checks the drafts left to right with the speculative
              sampling test, min(1, p/q), keeps the accepted run, and redrafts the rest.
              Training-free, and its samples follow the sequential distribution exactly.
- `parallel`: MaskGIT (Chang et al., CVPR 2022): a bidirectional transformer trained to
              fill masked tokens fixes the most confident ones each step, on a cosine
              schedule, in a fixed number of steps. Needs the `masked` objective.
- `scales`:   next-scale prediction (VAR: Tian et al., NeurIPS 2024): every token of a
              scale drawn in one pass, from the coarser scales and the condition, over a
              cache of the coarser scales' keys and values (model.ScaleCache). One pass
              per scale (5 for scales 1,2,3,5,7), each over that scale's tokens alone.
              The cache grows, but by the same sizes in every decode: the whole decode
              has shapes fixed by the batch size, and it is what the engines take (one
              compiled program, one ONNX graph, one CUDA graph for all five passes).
              Needs the `scales` objective and a multi-scale tokenizer. Two sampling
              settings of its own (`scale_options`): guidance that ramps up over the
              scales (VAR's), and the finest scale's own temperature, whose tokens,
              drawn together, do not see each other.
- `scales-naive`: the same, the whole sequence again for every scale (the training
              pass, the scales not yet drawn hidden by the block-causal mask): the
              reference `scales` is held to, and a pass of fixed shape for the engines.

Every strategy takes the same arguments (network, prefix, noise, options) and returns
(tokens, passes); `network` holds the transformer and the two kinds of pass it offers,
either of which an engine may have wrapped. A strategy's registry entry says which
training objective it needs and which of its passes has fixed shapes: that is all an
engine (compile, cudagraph) learns about it, through the generator (generator.py).
Adding a strategy means a function here and one registry entry.

Noise: three uniforms per token position, `u` (draws by inverse CDF), `r` (the Jacobi
acceptance test; MaskGIT's confidence noise) and `v` (Jacobi's draw from the residual
distribution after a rejection). Sequential decoders use `u` alone, so `naive`, `kv`
and `static` give the same tokens for the same noise, and so do `scales` and
`scales-naive` (a token's `u` at its own position, whichever pass draws it).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from genfast.families.ar.model import ARNet, ScaleCache, Step
from genfast.families.ar.tokenizer import VQVAENet
from genfast.families.base import Exported, ExportedLoop, LoopPlan


@dataclass
class Options:
    cfg: float = 1.0           # classifier-free guidance scale (1 = the conditional model alone)
    temperature: float = 1.0   # 0 = greedy
    top_k: int = 0             # 0 = the whole vocabulary
    parallel_steps: int = 8    # MaskGIT's number of steps
    choice_temperature: float = 4.5  # MaskGIT's Gumbel noise on the confidences, annealed to 0 (Chang et al.'s 4.5)
    jacobi_window: int = 16    # drafts checked per Jacobi pass
    # Next-scale decoding only (scale_options):
    cfg_schedule: str = "constant"  # "linear": guidance from 1 at the first scale up to cfg at the last (VAR's)
    last_scale_temperature: float | None = None  # the finest scale's temperature (None: temperature)


CFG_SCHEDULES = ("constant", "linear")


@dataclass
class Network:
    """What a strategy runs. `net` gives the conditioning and the sizes; `forward` is the
    full-sequence pass (prefix, tokens) -> logits at every position, and `static_step(rows,
    options)` the fixed-shape cached step that draws the next token, for a batch of `rows`:
    by default a fresh one, or an engine's compiled or recorded ones. `tokenizer` is what
    next-scale decoding turns drawn tokens into the next scale's input with (None for the
    other strategies, which read token ids)."""

    net: ARNet
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    static_step: Callable[[int, Options], SampledStep] | None = None
    tokenizer: VQVAENet | None = None

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


class DecodeCall(nn.Module):
    """One call of the static decode written for export, with no side effect, so that the
    whole decode is P + T - 1 calls of one function (`static_loop`): (tokens (B,), position
    (1,), uniforms (B,), prefix row (rows, width), *keys, *values) -> (the next tokens (B,),
    *the position's keys, *its values (rows, heads, 1, head dim) per layer). Each layer's
    cache is passed as the slots written so far, (written, rows, heads, head dim): stored
    position-major, those are the first `written` slots of its buffer, so a runtime reads
    them in place (ONNX Runtime binds the prefix of the buffer) and writes the position's
    keys and values straight into its slot: no copy, no mask and no slice in the graph.
    The condition's positions take their input from the prefix row, the others from the
    token (the previous call's output), so the prefill is calls of the same function.
    The same arithmetic as Block and Attention for one token, in 2-D activations (a Linear
    is one Gemm), the new key and value attended beside the cache instead of written into
    a copy of it. The tests hold it to the eager static decoder's tokens."""

    def __init__(self, net: ARNet, options: Options):
        super().__init__()
        self.net, self.options, self.guided = net, options, options.cfg != 1.0

    def forward(self, tokens: torch.Tensor, position: torch.Tensor, uniforms: torch.Tensor,
                prefix_row: torch.Tensor, *cache: torch.Tensor):
        net, rows = self.net, prefix_row.shape[0]
        heads, head_dim = net.heads, net.width // net.heads
        keys, values = cache[:net.layers], cache[net.layers:]
        token_rows = torch.cat([tokens, tokens]) if self.guided else tokens
        x = torch.where(position < net.prefix_tokens, prefix_row, net.wte(token_rows)) + net.wpe(position)
        scale = head_dim ** -0.5
        new_keys, new_values = [], []
        for block, layer_keys, layer_values in zip(net.blocks, keys, values):
            # (rows, heads, 1, hd) each, in two nodes (a view and unbind made seven).
            q, k, v = block.attn.qkv(block.ln1(x)).reshape(rows, 3 * heads, 1, head_dim).split(heads, 1)
            # Attention over [the written slots, this token]: the same weights as over the cache
            # with this token written into its slot.
            scores = torch.cat([q @ layer_keys.permute(1, 2, 3, 0), (q * k).sum(-1, keepdim=True)], -1)
            cached, own = (scores * scale).softmax(-1).split([layer_keys.shape[0], 1], -1)
            attended = cached @ layer_values.permute(1, 2, 0, 3) + own * v
            x = x + block.attn.proj(attended.reshape(rows, net.width))
            x = x + block.mlp(block.ln2(x))
            new_keys.append(k)
            new_values.append(v)
        probs = guided_probs(net.head(net.ln_f(x)), self.options, self.guided)
        return draw(probs, uniforms), *new_keys, *new_values


def static_loop(net: ARNet, options: Options) -> ExportedLoop:
    """The static decode as calls of one exported DecodeCall, chained through buffers: call c
    (positions 0 .. P + T - 2) reads the prefix row c (c < P) or token c - P, and the slots
    before c; writes slot c and, from the condition's last position on, token c - P + 1
    drawn with that token's uniforms. The same tokens as `static`, in P + T - 1 calls of
    one shape each (the eager prefill is one pass of P positions)."""
    guided = options.cfg != 1.0
    heads, head_dim, length = net.heads, net.width // net.heads, net.prefix_tokens + net.sequence_length
    batch, written = torch.export.Dim("batch", min=1), torch.export.Dim("written", min=0, max=length - 1)
    rows = 2 * batch if guided else batch
    example_batch = 2  # torch.export specialises on a batch of 1
    example_rows = 2 * example_batch if guided else example_batch
    like = dict(device=net.null.device, dtype=net.null.dtype)
    example = (torch.zeros(example_batch, dtype=torch.long, device=net.null.device),
               torch.tensor([net.prefix_tokens + 3], device=net.null.device),
               torch.full((example_batch,), 0.5, device=net.null.device), torch.zeros(example_rows, net.width, **like),
               *[torch.zeros(5, example_rows, heads, head_dim, **like) for _ in range(2 * net.layers)])
    shapes = ({0: batch}, {}, {0: batch}, {0: rows}, ({0: written, 1: rows},) * (2 * net.layers))  # *cache: one entry
    call = Exported(DecodeCall(net, options), example, shapes, ("static loop", dataclasses.astuple(options)))
    return ExportedLoop(call, lambda batch_size: _static_plan(net, options, batch_size))


@torch.inference_mode(False)  # normal tensors, also when planned in inference_mode (auto's probe)
def _static_plan(net: ARNet, options: Options, batch: int) -> LoopPlan:
    """static_loop's buffers for `batch` images and every call's views of them (normal
    tensors, so that a loop run outside inference_mode may still write them)."""
    guided = options.cfg != 1.0
    prefix_tokens, length = net.prefix_tokens, net.prefix_tokens + net.sequence_length
    rows, heads, head_dim = (2 * batch if guided else batch), net.heads, net.width // net.heads
    device, dtype = net.null.device, net.null.dtype
    keys = torch.zeros(net.layers, length, rows, heads, head_dim, device=device, dtype=dtype)  # slot-major
    values = torch.zeros_like(keys)
    prefix = torch.zeros(prefix_tokens, rows, net.width, device=device, dtype=dtype)
    uniforms = torch.zeros(net.sequence_length, batch, device=device)
    tokens = torch.zeros(net.sequence_length, batch, dtype=torch.long, device=device)
    # What the calls before the first draw read and write instead of tokens and uniforms.
    idle_tokens, idle_uniforms = torch.zeros_like(tokens[0]), torch.zeros_like(uniforms[0])
    idle_row, drawn_before = torch.zeros_like(prefix[0]), torch.zeros_like(tokens[0])
    calls = []
    for c in range(length - 1):
        drawn = c - prefix_tokens + 1  # the token this call draws, when >= 0
        inputs = (tokens[c - prefix_tokens] if c >= prefix_tokens else idle_tokens,
                  torch.tensor([c], device=device), uniforms[drawn] if drawn >= 0 else idle_uniforms,
                  prefix[c] if c < prefix_tokens else idle_row,
                  *(layer[:c] for layer in keys), *(layer[:c] for layer in values))
        outputs = (tokens[drawn] if drawn >= 0 else drawn_before,  # slot c as the call writes it: (rows, heads, 1, hd)
                   *(layer[c].unsqueeze(2) for layer in keys), *(layer[c].unsqueeze(2) for layer in values))
        calls.append((inputs, outputs))

    def load(condition: torch.Tensor, noise: torch.Tensor) -> None:
        if guided:
            condition = torch.cat([condition, net.null_prefix(batch)])
        prefix.copy_(condition.transpose(0, 1))
        uniforms.copy_(noise[:, 0].T)

    return LoopPlan(calls, load, lambda: tokens.T.contiguous())  # row-major, as the eager decoders give it


class Decoder:
    """The shared set-up: the condition prefix (doubled with the null condition under
    guidance), the sequence length and the passes counter."""

    def __init__(self, net: ARNet, prefix: torch.Tensor, options: Options):
        self.options = options
        self.guided = options.cfg != 1.0
        # shape[0], not len(): len() is a Python int, which would fix the batch size of an export
        self.prefix = torch.cat([prefix, net.null_prefix(prefix.shape[0])]) if self.guided else prefix
        self.batch, self.length, self.passes = prefix.shape[0], net.sequence_length, 0

    def rows(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.cat([tokens, tokens]) if self.guided else tokens

    def probs(self, logits: torch.Tensor, options: Options | None = None) -> torch.Tensor:
        """A pass's probabilities, under `options` where a pass has its own (default: the decode's)."""
        self.passes += 1
        return guided_probs(logits, options or self.options, self.guided)


def naive(network: Network, prefix: torch.Tensor, noise: torch.Tensor, options: Options) -> tuple[torch.Tensor, int]:
    d = Decoder(network.net, prefix, options)
    tokens = torch.zeros(d.batch, 0, dtype=torch.long, device=prefix.device)
    for i in range(d.length):
        logits = network.forward(d.prefix, d.rows(tokens))[:, -1]
        tokens = torch.cat([tokens, draw(d.probs(logits), noise[:, 0, i])[:, None]], 1)
    return tokens, d.passes


def kv(network: Network, prefix: torch.Tensor, noise: torch.Tensor, options: Options) -> tuple[torch.Tensor, int]:
    """The prefix in one pass (prefill), then one token a pass over a growing cache."""
    return favoured_kv(network, prefix, None, 1.0, noise, options)


def favoured_kv(network: Network, prefix: torch.Tensor, source: torch.Tensor | None, favour: float,
                noise: torch.Tensor, options: Options) -> tuple[torch.Tensor, int]:
    """kv with a source grid's tokens favoured (genfast transfer): before token i is drawn (with
    noise[:, 0, i], as kv draws it), the probability of source[:, i] is multiplied by `favour`, so
    the source's token is kept wherever the condition finds it likely enough, and re-made where
    it does not. No source, or favour 1, is kv."""
    net, stepper = network.net, network.net.dynamic_step()
    d = Decoder(net, prefix, options)
    logits = stepper.prefill(d.prefix)
    positions = torch.arange(net.prefix_tokens, net.prefix_tokens + d.length, device=prefix.device)
    tokens = []
    for i in range(d.length):
        probs = d.probs(logits)
        if source is not None and favour != 1.0:
            mine = source[:, i:i + 1]
            probs = probs.scatter(1, mine, probs.gather(1, mine) * favour)  # draw normalises
        tokens.append(draw(probs, noise[:, 0, i]))
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
    tokens = torch.full((len(prefix), net.sequence_length), net.mask_token, dtype=torch.long, device=prefix.device)
    return continue_parallel(network, prefix, tokens, tokens == net.mask_token, noise, options)


def continue_parallel(network: Network, prefix: torch.Tensor, tokens: torch.Tensor, masked: torch.Tensor,
                      noise: torch.Tensor, options: Options) -> tuple[torch.Tensor, int]:
    """MaskGIT decoding of the `masked` positions of `tokens` (B, T), the others kept as
    given (genfast transfer); every row has the same number M masked, and M * cos(pi/2 *
    step/steps) stay masked after each step. All masked (M = T) is `parallel`."""
    net = network.net
    d = Decoder(net, prefix, options)
    steps, start = options.parallel_steps, int(masked[0].sum())
    if not start:
        return tokens, 0
    tokens = tokens.masked_fill(masked, net.mask_token)
    gumbel = -torch.log(-torch.log(noise[:, 1].clamp(1e-10, 1 - 1e-7)))
    for step in range(steps):
        logits = network.forward(d.prefix, d.rows(tokens))[:, net.prefix_tokens:]
        p = d.probs(logits)
        sampled = draw(p, noise[:, 0])
        confidence = p.gather(2, sampled[..., None]).squeeze(2).clamp_min(1e-30).log()
        confidence = confidence + options.choice_temperature * (1 - (step + 1) / steps) * gumbel
        confidence = confidence.masked_fill(~masked, math.inf)  # fixed tokens stay fixed
        remaining = int(masked[0].sum())
        keep_masked = 0 if step == steps - 1 else min(remaining - 1,
                                                      math.floor(start * math.cos(math.pi / 2 * (step + 1) / steps)))
        keep_masked = max(keep_masked, 0)
        order = confidence.argsort(1)  # least confident first
        still = torch.zeros_like(masked).scatter(1, order[:, :keep_masked], True) & masked
        newly = masked & ~still
        tokens = torch.where(newly, sampled, tokens)
        masked = still
    return tokens, d.passes


def scale_options(options: Options, scale: int, scales: int) -> Options:
    """The sampling options of next-scale pass `scale` of `scales`.
    - Guidance on its schedule: "linear" is VAR's, none at the first scale rising to `cfg` at
      the last, so the coarse layout keeps the model's own diversity and the detail follows
      the condition.
    - The finest scale at `last_scale_temperature`. Its tokens are drawn together, each from
      its own distribution without seeing what its neighbours drew, so at temperature 1
      neighbours may pick details that do not fit one another; a lower temperature keeps each
      to its likeliest details. The coarser scales' tokens fix the layout, so they keep the
      decode's temperature (BENCHMARKS.md, "Next-scale prediction": FID against both)."""
    last = scale == scales - 1
    cfg = options.cfg
    if options.cfg_schedule == "linear":
        cfg = 1 + (options.cfg - 1) * (scale / (scales - 1) if scales > 1 else 1.0)
    temperature = options.last_scale_temperature if last and options.last_scale_temperature is not None \
        else options.temperature
    return dataclasses.replace(options, cfg=cfg, temperature=temperature)


def scales(network: Network, prefix: torch.Tensor, noise: torch.Tensor,
           options: Options) -> tuple[torch.Tensor, int]:
    """Next-scale decoding over a ScaleCache: pass k reads scale k's input (the coarser scales'
    accumulated grid at its side; the prefix comes with scale 0's, in the first pass) with the
    cached keys and values of everything before it, and draws all of scale k's tokens."""
    return favoured_scales(network, prefix, None, 1.0, noise, options)


def favoured_scales(network: Network, prefix: torch.Tensor, source: torch.Tensor | None, favour: float,
                    noise: torch.Tensor, options: Options) -> tuple[torch.Tensor, int]:
    """scales with a source's tokens favoured (genfast transfer), as favoured_kv does for the
    causal model: before a scale's tokens are drawn, the probability of the source's token at
    each of its positions is multiplied by `favour`. Each scale is drawn over the coarser
    scales as drawn here, so where the target re-made the coarse layout, the finer scales
    follow the new one and keep the source's detail only where it still fits. No source, or
    favour 1, is scales."""
    net, tokenizer = network.net, network.tokenizer
    d = Decoder(net, prefix, options)
    cache, drawn, accumulated = ScaleCache(), [], tokenizer.empty_grid(d.batch)
    for scale, span in enumerate(tokenizer.spans):
        x = net.wte(d.rows(tokenizer.scale_input(accumulated, scale)))
        if scale == 0:  # the condition counts as the first scale (model.py), and comes in its pass
            x = torch.cat([d.prefix, x], 1)
        end = net.prefix_tokens + span.stop
        positions = torch.arange(end - x.shape[1], end, device=prefix.device)
        logits = net.step(x, cache, positions)[:, -(span.stop - span.start):]
        probs = d.probs(logits, scale_options(options, scale, len(tokenizer.spans)))
        if source is not None and favour != 1.0:
            mine = source[:, span, None]
            probs = probs.scatter(2, mine, probs.gather(2, mine) * favour)  # draw normalises
        tokens = draw(probs, noise[:, 0, span])
        drawn.append(tokens)
        if scale + 1 < len(tokenizer.spans):
            accumulated = accumulated + tokenizer.contribution(tokens, scale)
    return torch.cat(drawn, 1), d.passes


def scales_naive(network: Network, prefix: torch.Tensor, noise: torch.Tensor,
                 options: Options) -> tuple[torch.Tensor, int]:
    """Next-scale decoding with no cache: for every scale the whole sequence again, the
    training pass over the inputs of the tokens drawn so far; the scales not drawn yet stand
    at token 0, which the block-causal mask keeps from every logit read. Every pass has the
    same shapes (`forward` is this strategy's fixed part)."""
    net, tokenizer = network.net, network.tokenizer
    d = Decoder(net, prefix, options)
    tokens = torch.zeros(d.batch, d.length, dtype=torch.long, device=prefix.device)
    for scale, span in enumerate(tokenizer.spans):
        logits = network.forward(d.prefix, d.rows(tokenizer.next_scale_inputs(tokens)))
        scale_logits = logits[:, net.prefix_tokens + span.start:net.prefix_tokens + span.stop]
        options_here = scale_options(options, scale, len(tokenizer.spans))
        tokens[:, span] = draw(d.probs(scale_logits, options_here), noise[:, 0, span])
    return tokens, d.passes


@dataclass(frozen=True)
class Strategy:
    """A registry entry: the loop, what it needs, and which of its passes has fixed shapes."""

    run: Callable[[Network, torch.Tensor, torch.Tensor, Options], tuple[torch.Tensor, int]]
    objective: str             # the training objective it decodes: "causal", "masked" or "scales"
    # Its fixed-shape part: "step" (static_step), "forward", "decode" (the whole decode: every
    # pass's shapes follow from the batch size alone), or None (its inputs grow with the data)
    fixed: str | None
    summary: str               # one line for --help
    # A decode of one length that never reads a tensor's value on the host, which a recorder
    # (cudagraph) can capture whole: its passes (tokenizer, net) -> count; None: not recordable.
    recorded_passes: Callable[[VQVAENet, ARNet], int] | None = None
    exported_loop: Callable[[ARNet, Options], ExportedLoop] | None = None  # that decode as chained calls, to export


DECODERS: dict[str, Strategy] = {
    "naive": Strategy(naive, "causal", None, "the whole sequence again for every token"),
    "kv": Strategy(kv, "causal", None, "one token a pass over a growing key/value cache"),
    "static": Strategy(static, "causal", "step", "kv over a cache of fixed size: compile wraps its step, cudagraph "
                       "records all of it, onnx replays it as chained calls",
                       recorded_passes=lambda tokenizer, net: net.sequence_length, exported_loop=static_loop),
    "jacobi": Strategy(jacobi, "causal", "forward", "speculative Jacobi: all tokens drafted, checked, redrafted"),
    "parallel": Strategy(parallel, "masked", "forward", "MaskGIT: the most confident masked tokens fixed per step"),
    "scales": Strategy(scales, "scales", "decode", "next-scale (VAR): a scale's tokens a pass, over a key/value cache "
                       "of the coarser scales; compile, onnx and cudagraph take all of it as one call",
                       recorded_passes=lambda tokenizer, net: len(tokenizer.spans)),
    "scales-naive": Strategy(scales_naive, "scales", "forward", "next-scale, the whole sequence again for every "
                             "scale"),
}


def fitting(objective: str) -> list[str]:
    """The strategies that decode a model trained with `objective`."""
    return [name for name, strategy in DECODERS.items() if strategy.objective == objective]
