"""The protocols: what a model family declares, the sampler it hands out, and what a
sampler that decodes in a loop offers the engines.

A family (`Family`) knows its networks, its loss and how to turn trained networks
into a *sampler*: a pure, fixed-shape function from noise (and an optional class
label or prompt embedding) to images in [-1, 1]. Randomness is drawn outside the
sampler from seeded streams (seeding.py), so every engine can wrap the same
function and every test can compare an engine with the eager reference on the same
noise.

Every hook a caller (trainer, loader, CLI, metrics, server) may use is declared
here, with its neutral default where a family may go without it; callers call the
hook, they never probe for it. A new family subclasses `Family` and is added to
`FAMILIES` (families/__init__.py); nothing else needs an edit.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, ABCMeta, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from tqdm import tqdm

from genfast.errors import GenfastError
from genfast.seeding import NOISE_BLOCK, check_seed, noise_block

SampleFn = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
PromptEncoder = Callable[[str], torch.Tensor]  # one prompt -> its (1, D) condition row


@dataclass
class Sampler:
    """Noise in, pixels out, plus what a caller needs to draw the noise."""

    fn: SampleFn                       # (noise (B, *noise_shape), labels (B,) or None) -> (B, C, H, W) in [-1, 1]
    noise_shape: tuple[int, ...]       # per image
    image_shape: tuple[int, int, int]  # (C, H, W)
    class_names: tuple[str, ...] = ()  # empty for an unconditional model
    info: dict[str, Any] = field(default_factory=dict)  # family, model, dataset, step, path (set by genfast.load)
    module: nn.Module | None = None    # the network fn runs, (noise, labels) -> pixels: what engines transform
    # A network that decodes in a loop of data-dependent length (a LoopNetwork, or one an
    # engine made from it): engines that trace or export one call cannot take it.
    loops: bool = False
    encode_prompt: PromptEncoder | None = None  # a text-conditioned model: a prompt -> its condition row

    @classmethod
    def from_module(cls, module: nn.Module, noise_shape: tuple[int, ...], image_shape: tuple[int, int, int],
                    class_names: tuple[str, ...] = ()) -> Sampler:
        """The eager sampler of a network: eval mode, no autograd, inputs moved to its device."""
        module = module.eval()
        device = next(module.parameters()).device

        @torch.inference_mode()
        def generate(noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
            return module(noise.to(device), None if labels is None else labels.to(device))

        return cls(generate, noise_shape, image_shape, class_names, module=module,
                   loops=isinstance(module, LoopNetwork))

    @property
    def conditional(self) -> bool:
        return bool(self.class_names)

    @property
    def device(self) -> torch.device:
        """Where the network runs (the CPU for a sampler without a PyTorch network)."""
        return torch.device("cpu") if self.module is None else next(self.module.parameters()).device

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def takes_prompts(self) -> bool:
        return self.encode_prompt is not None

    def __call__(self, noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.fn(noise, labels)

    def prompt_condition(self, prompt: str, n: int) -> torch.Tensor:
        """The condition that makes n images of `prompt` (an empty prompt: unconditional)."""
        if self.encode_prompt is None:
            raise GenfastError("--prompt needs a text-conditioned ar model (ar-text-...); this one is not")
        return self.encode_prompt(prompt).expand(n, -1)

    def with_decoding(self, decode: str | None = None, **options) -> Sampler:
        """A copy of a looping sampler (ar) that decodes with strategy `decode` (None: its
        own) and the given options (None leaves one as it is); the weights are shared."""
        if not isinstance(self.module, LoopNetwork):
            raise GenfastError("decoding strategies apply to models that decode token by token (ar); "
                               "this one makes an image in one call")
        network = self.module.with_decoding(decode, **options)
        copy = Sampler.from_module(network, self.noise_shape, self.image_shape, self.class_names)
        return dataclasses.replace(copy, info=self.info | {"decode": network.decode},
                                   encode_prompt=self.encode_prompt)

    def noise(self, n: int, seed: int, start: int = 0) -> torch.Tensor:
        """The noise of images start..start+n-1 of `seed`: a fresh draw for every image (each
        block of NOISE_BLOCK images is its own stream: seeding.py), and image i's noise is the
        same whatever the range, batch or process that draws it (bulk generation relies on it)."""
        check_seed(seed)
        first, last = start // NOISE_BLOCK, (start + n - 1) // NOISE_BLOCK
        blocks = [noise_block(seed, j, self.noise_shape) for j in range(first, last + 1)]
        offset = start - first * NOISE_BLOCK
        return torch.cat(blocks)[offset:offset + n]

    def class_index(self, name_or_index: str | int) -> int:
        """A class index (int), or a class name or index as text (`--class`) -> the index."""
        if not self.conditional:
            raise GenfastError("a class was asked for, but this model is unconditional")
        return class_index(self.class_names, name_or_index)

    def labels(self, n: int, class_index: str | int | None = None, start: int = 0) -> torch.Tensor | None:
        """Labels for images start..start+n-1: all `class_index`, or cycling through the
        classes (image i has class i mod the number of classes, whatever the range)."""
        if not self.conditional:
            if class_index is not None:
                raise GenfastError("a class was asked for, but this model is unconditional")
            return None
        if class_index is None:
            return torch.arange(start, start + n) % self.num_classes
        return torch.full((n,), self.class_index(class_index), dtype=torch.long)

    def batches(self, n: int, seed: int = 0, class_index: str | int | None = None, batch_size: int = 256,
                progress: bool = False, condition: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
        """n images for `seed`, made and handed out `batch_size` at a time (on the CPU);
        `condition` (one row per image: a text model's prompt embeddings) replaces the labels."""
        if n < 1:
            raise GenfastError(f"number of images must be at least 1, got {n}")
        if batch_size < 1:
            raise GenfastError(f"batch size must be at least 1, got {batch_size}")
        if condition is None:
            self.labels(1, class_index)  # a wrong class fails before any work
        with tqdm(total=n, desc="sampling", unit="img", disable=not progress) as bar:
            for start in range(0, n, batch_size):
                # Noise and labels a batch at a time: memory does not grow with n.
                end = min(start + batch_size, n)
                labels = self.labels(end - start, class_index, start) if condition is None else condition[start:end]
                yield self.fn(self.noise(end - start, seed, start), labels).cpu()
                bar.update(end - start)

    def interpolate(self, rows: int, steps: int, seed: int = 0, class_index: str | int | None = None,
                    batch_size: int = 256) -> torch.Tensor:
        """rows walks of `steps` images each, from one sample of `seed` to another, row by row.

        A conditional model keeps each row in one class (`class_index`, or cycling)."""
        if steps < 2:
            raise GenfastError(f"an interpolation needs at least 2 steps, got {steps}")
        ends = self.noise(2 * rows, seed).flatten(1)
        t = torch.linspace(0, 1, steps).repeat(rows)
        a, b = ends[0::2].repeat_interleave(steps, 0), ends[1::2].repeat_interleave(steps, 0)
        noise = slerp(a, b, t).view(rows * steps, *self.noise_shape)
        labels = self.labels(rows, class_index)
        labels = None if labels is None else labels.repeat_interleave(steps)
        return torch.cat([self.fn(noise[i:i + batch_size], None if labels is None else labels[i:i + batch_size]).cpu()
                          for i in range(0, len(noise), batch_size)])

    def generate(self, n: int, seed: int = 0, class_index: str | int | None = None, batch_size: int = 256,
                 progress: bool = False, condition: torch.Tensor | None = None) -> torch.Tensor:
        """n images for `seed` as one (n, C, H, W) tensor in [-1, 1]."""
        return torch.cat(list(self.batches(n, seed, class_index, batch_size, progress, condition)))


def class_index(class_names: tuple[str, ...], name_or_index: str | int) -> int:
    """Text is matched against the names first (exactly, then ignoring case), since a
    folder data set may name its classes "3" and "7"; then read as an index."""
    listing = ", ".join(f"{i}={n}" for i, n in enumerate(class_names))
    if isinstance(name_or_index, str):
        lowered = [n.lower() for n in class_names]
        if name_or_index in class_names:
            return class_names.index(name_or_index)
        if name_or_index.lower() in lowered:
            return lowered.index(name_or_index.lower())
        digits = name_or_index.removeprefix("-")
        if not (digits.isascii() and digits.isdigit()):  # str.isdigit alone takes "²", which int() refuses
            raise GenfastError(f"unknown class {name_or_index[:40]!r}; this model's classes: {listing}")
    text = str(name_or_index)
    index = int(text) if len(text) <= 12 else -1  # longer: out of range whatever it says, and not echoed whole
    if not 0 <= index < len(class_names):
        raise GenfastError(f"class {text[:20]} is outside this model's classes 0..{len(class_names) - 1} ({listing})")
    return index


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between rows of a and b at fractions t: the path that stays
    where Gaussian noise lives (a straight line passes through improbably short vectors)."""
    a_unit, b_unit = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
    omega = torch.acos((a_unit * b_unit).sum(-1, keepdim=True).clamp(-1, 1))
    t = t[:, None]
    so = torch.sin(omega)
    mixed = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / so.clamp_min(1e-7)
    return torch.where(so > 1e-7, mixed, (1 - t) * a + t * b)  # (anti)parallel: fall back to a line


@dataclass
class TrainedConfig:
    """The fields every family's config has: the trainer reads them, and fills in the
    last three from the data set when training starts (they are saved with the checkpoint).
    The learning-rate schedule is the trainer's, for every optimizer of every family
    (train.learning_rate_share): a linear warm-up over the first `warmup_steps`, constant,
    then linearly down over the run's last `decay_steps`, to 1/decay_steps of it at the last
    step (0: no decay)."""

    batch_size: int = 128
    warmup_steps: int = 0
    decay_steps: int = 0
    conditional: bool = False
    image_size: int = 28
    channels: int = 1
    num_classes: int = 0


# What a config (or a checkpoint header, written by anyone) may say before a network is
# built: sizes far beyond any model genfast makes are refused here, cheaply, rather than
# costing gigabytes or overflowing a size calculation first.
MAX_SIZE = 1 << 24   # any whole-number field (widths, counts, steps)
BOUNDS = {"image_size": (4, 1024), "channels": (1, 4), "num_classes": (0, 100_000)}


def check_bounds(config: Any, where: str = "config") -> None:
    """Every whole-number field within MAX_SIZE, the shared ones within BOUNDS; one line naming the key."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if not isinstance(value, int) or isinstance(value, bool):
            continue
        low, high = BOUNDS.get(f.name, (-MAX_SIZE, MAX_SIZE))
        if not low <= value <= high:
            raise GenfastError(f"{where} {f.name}={value} is outside {low}..{high}; a file that says so is damaged "
                               f"or was edited")


@dataclass(frozen=True)
class FixedPart:
    """The part of a looping network that runs with the same shapes on every call (for a
    given batch size), which compile, cudagraph and onnx replace with a faster equivalent.
    A fixed pass also offers `exported()` (an `Exported`), and a recorded whole decode
    `exported_loop()` (an `ExportedLoop`), for engines that hand it to another runtime.
    `whole`: the part is the entire decode (next-scale's: a few passes of shapes known in
    advance), so an engine exports it as one call rather than as a loop of calls."""

    name: str            # for people: "the static decoder's token step"
    whole: bool = False


@dataclass
class Exported:
    """A fixed part as a pure function, for an engine that exports it (onnx): `module` maps
    its inputs to its outputs with no side effect. `dynamic_shapes` marks the axes that
    vary (the batch, a length) for torch.export, so one export serves every batch size;
    parts with equal `key` compute the same function."""

    module: nn.Module
    example: tuple[torch.Tensor, ...]   # inputs of one call, for tracing
    dynamic_shapes: tuple  # torch.export's dynamic_shapes for module(*example) (a *args parameter takes one entry)
    key: tuple
    # Functions it runs besides its modules' methods (a decoding strategy's loop): a cache of
    # exports keyed on the code's source reads their files too.
    code: tuple[Callable, ...] = ()


@dataclass
class LoopPlan:
    """A loop's buffers for one batch size, as the calls see them: every call's inputs and
    outputs, in order, are contiguous views of buffers the plan owns (a call's output is a
    later call's input), so an engine binds each call once and replays the loop with no
    copy between calls. `load(*arguments)` copies one loop's arguments into the buffers;
    `result()` reads its output from them (a copy)."""

    calls: list[tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]]
    load: Callable[..., None]
    result: Callable[[], torch.Tensor]


@dataclass
class ExportedLoop:
    """A recorded part (a whole decode of fixed length) as calls of one exported function,
    `call`, chained through the buffers of `plan(batch size)`: what an engine that cannot
    record a loop (ONNX Runtime) replays instead, as a CUDA graph replays its recording."""

    call: Exported
    plan: Callable[[int], LoopPlan]


Wrap = Callable[[nn.Module], Callable[..., torch.Tensor]]  # an engine's wrapper of a fixed part


class LoopNetwork(nn.Module, metaclass=ABCMeta):
    """The network of a sampler that decodes in a loop (ar): (noise, condition) -> pixels
    through a decoding strategy. Its acceleration surface: engines never name a strategy,
    they ask for the fixed-shape part and hand back a wrapper for it."""

    decode: str      # the decoding strategy it runs
    passes: int = 0  # forward passes of the last call (every row of the batch takes them together)

    @abstractmethod
    def fixed_part(self) -> FixedPart | None:
        """The part of the current strategy with fixed shapes, or None (its inputs grow)."""

    @abstractmethod
    def fixed_part_advice(self, recorded: bool) -> str:
        """For an engine's one-line error: which settings give a fixed part (recorded: a
        recorded_part)."""

    @abstractmethod
    def with_fixed_part(self, wrap: Wrap) -> LoopNetwork:
        """The same weights and settings, the fixed part run through `wrap` (after any
        wrapper it already has, so engines compose: compile+cudagraph)."""

    @abstractmethod
    def recorded_part(self) -> FixedPart | None:
        """What a recorder (cudagraph) captures whole: the entire decode, where the strategy
        has a fixed length and never waits on a tensor's value; else None."""

    @abstractmethod
    def with_recorded_part(self, record: Wrap) -> LoopNetwork:
        """The same, its whole decode, a module (prefix (B, P, C), uniforms (B, 3, T)) ->
        tokens (B, T), run through `record` (the fixed part's wrapper, if any, inside it)."""

    @abstractmethod
    def with_decoding(self, decode: str | None = None, **options) -> LoopNetwork:
        """The same weights, decoding with `decode` (None: the same) and the given options
        (None leaves one unchanged); raises GenfastError for a strategy that does not fit."""


class Family(ABC):
    """What the trainer, the checkpoint loader, the CLI, metrics and the server need from a
    family. The abstract members every family defines; the others have a neutral default."""

    name: ClassVar[str]                        # registry key: "gan", "vae", "ar"
    config_class: ClassVar[type]               # the hyperparameter dataclass (a TrainedConfig)
    presets: ClassVar[dict[str, dict[str, Any]]]  # named sets of config values; "default" at least
    optimizer_keys: ClassVar[tuple[str, ...]]  # config keys a resumed run may change (learning rates, betas)
    generative: ClassVar[bool]                 # False: no sampler; judged by evaluate() on the test split instead
    sampling_keys: ClassVar[tuple[str, ...]] = ()  # config keys genfast.load(**settings) may change (ar: decode, cfg)
    reconstructs: ClassVar[bool] = False       # has an encoder: reconstruct() works (sample --reconstruct)

    @abstractmethod
    def model_name(self, config: Any) -> str:
        """Short name of the variant for people: "gan" or "cgan"."""

    @abstractmethod
    def build(self, config: Any) -> dict[str, nn.Module]:
        """Fresh networks for `config` (image shape and classes already filled in); a config
        that cannot be built is a GenfastError naming the key."""

    @abstractmethod
    def optimizers(self, modules: dict[str, nn.Module], config: Any) -> dict[str, torch.optim.Optimizer]:
        """One optimizer per trained module, keyed like `modules`."""

    @abstractmethod
    def train_step(self, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                   images: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator,
                   config: Any) -> dict[str, float]:
        """One optimisation step on a batch of [-1, 1] images; returns the losses to log
        (keys starting with "loss" are watched for divergence)."""

    @abstractmethod
    def inference_modules(self) -> tuple[str, ...]:
        """The modules a sampler needs (what a slim, shipped checkpoint keeps)."""

    def prepare(self, config: Any, train_set) -> tuple[Any, dict[str, dict[str, torch.Tensor]]]:
        """Before a new run (not a resumed one): the config completed from trained parts it
        builds on, and initial weights per module (ar: its tokenizer). Default: nothing."""
        return config, {}

    def start_run(self, modules: dict[str, nn.Module], config: Any, train_set, seed: int) -> None:  # noqa: B027
        """Before the first step of every run, new or resumed, once the weights are in place: what
        training needs that the checkpoint does not keep, rebuilt from the data (ar text models:
        their embedded caption pool). Default: nothing."""

    def sampler(self, modules: dict[str, nn.Module], config: Any, class_names: tuple[str, ...]) -> Sampler:
        """The eager fp32 sampler: the reference every engine is compared with."""
        raise GenfastError(f"a {self.name} model does not generate images")

    def check_sampling(self, config: Any) -> None:  # noqa: B027 (a hook whose default is to do nothing)
        """Refuse sampling settings (`sampling_keys`) that cannot work, in one line. Default: none to check."""

    def evaluate(self, modules: dict[str, nn.Module], config: Any, images: torch.Tensor,
                 labels: torch.Tensor | None) -> dict[str, float]:
        """Scores on held-out images, logged at every checkpoint of a non-generative family
        (and saved in its header as extra["test"]). Default: none."""
        return {}

    def reconstruct(self, modules: dict[str, nn.Module], config: Any, images: torch.Tensor,
                    labels: torch.Tensor | None) -> torch.Tensor:
        """[-1, 1] images -> their reconstructions through the model (when `reconstructs`)."""
        raise GenfastError(f"reconstructions need a model with an encoder (vae, vqvae); this is a {self.name}")

    def describe(self, config: Any, test: dict[str, float]) -> str:
        """What the model is, for `genfast models` (test: its held-out scores, if any)."""
        return f"{config.num_classes} classes" if config.conditional else "unconditional"
