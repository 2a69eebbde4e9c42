"""The `captioner` family: image -> text. A small CNN reads the image; its features prefix a small
causal transformer that writes the caption word piece by word piece.

- Image encoder (`ImageReader`, which the clip family shares): the convolutions of the data set's
  judge (the shipped classifier-<data set>, families/classifier.py), frozen, and on their map (and on
  a small trained map of the pixels beside it) a trained 3x3 stride-2 convolution, one prefix token
  per cell (4x4 for 28x28 images), plus the judge's 256 features projected into one more token.
  Why the judge: on one CPU core a captioner trained from scratch for 15 minutes (2,400 steps)
  named the right class 84% of the time; the judge's convolutions already tell the classes apart
  (92.7% on Fashion-MNIST), so training only has to learn the words. The judge's weights travel
  in the checkpoint (as the ar family's tokenizer does), which captions with nothing else. A probe
  of the image tokens (their class and the third of each attribute) is trained beside the
  captions, so the trained convolutions learn what the attribute words need.
- Transformer: the ar package's GPT block (nanoGPT's, families/ar/model.py) over [image tokens,
  [CLS], word pieces], trained by next-piece prediction on the pieces alone; decoding runs over the
  ar package's KV cache (DynamicCache), greedy by default, and stops at [SEP].
- Words: MiniLM's WordPiece tokenizer (families/ar/text.py), its vocabulary cut to the pieces the
  captions can use (about 150 of its 30,522, which makes the output layer small). The pieces are
  kept in the config (`vocabulary`), so a checkpoint writes captions with neither the corpus nor
  the tokenizer; the tokenizer is needed for training only.
- Captions: drawn fresh at every step from the batch's images and labels by the caption corpus
  (corpus.captions_for: a class noun and words for the attributes measured from the pixels, in the
  training split's phrasings), so the model sees thousands of phrasings. A data set the corpus does
  not speak of (`fake`, a folder) gets the generic phrasings of its class names (text.captions).

`evaluate` (at every checkpoint, and `genfast eval`) captions the test split greedily and scores the
captions against the labels, the measured attributes and corpus references (caption_scores.py).
"""

from __future__ import annotations

import functools
import json
import math
import random
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from genfast import attributes, caption_scores, checkpoint, corpus
from genfast import config as configlib
from genfast.config import require
from genfast.errors import GenfastError
from genfast.families.ar import text
from genfast.families.ar.model import ARConfig, Block, DynamicCache
from genfast.families.base import Family, TrainedConfig, check_bounds
from genfast.families.classifier import ClassifierConfig, ClassifierNet

SPECIAL = ("[PAD]", "[CLS]", "[SEP]")  # MiniLM's names: padding, start of a caption, its end
PAD, BOS, EOS = range(len(SPECIAL))
# Pieces written without a space before them (WordPiece splits "t-shirt" into t, -, shirt and
# "woman's" into woman, ', s), and after which the next piece follows without one.
NO_SPACE_BEFORE = frozenset({",", ":", "-", "'"})
NO_SPACE_AFTER = frozenset({"-", "'"})


@dataclass
class CaptionerConfig(TrainedConfig):
    # Filled in when training starts, from the data set:
    dataset: str = ""                  # whose captions it learns (the corpus's, or its class names')
    class_names: tuple[str, ...] = ()
    vocabulary: tuple[str, ...] = ()   # SPECIAL, then the WordPiece pieces its captions use
    max_tokens: int = 32               # pieces a caption may have, [SEP] included (the corpus's longest: 19)
    classifier: str = ""               # the judge whose convolutions read the images (default: classifier-<data set>)
    classifier_config: str = ""        # that judge's config as JSON: filled in when training starts
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64                   # the captions' grammar is small: the image is the hard part
    dropout: float = 0.0
    probe_loss: float = 1.0            # weight of the image tokens' own loss beside the captions' (train_step)
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    batch_size: int = 64               # more, smaller steps: what a few epochs on a CPU core learn most from
    conditional: bool = True           # always labelled: captions are made from the labels


PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "tiny": {"n_layer": 1, "n_head": 2, "n_embd": 16, "batch_size": 32, "warmup_steps": 0},
}


# --- words <-> word pieces ----------------------------------------------------------------------

def caption_sources(dataset: str, class_names: tuple[str, ...]) -> list[str]:
    """Every string a training caption is assembled from: the corpus's training nouns, attribute words and
    templates (their slots left out), and the words its assembly adds; or the generic phrasings of the
    class names. WordPiece splits text into words at spaces and punctuation and each word into pieces
    on its own, so the pieces of these strings are the pieces of every caption made from them."""
    if not corpus.covers(dataset, class_names):
        return [p for phrasings in text.captions(dataset, class_names) for p in phrasings]
    nouns = [n for words in corpus.NOUNS[dataset] for n in words.train]
    adjectives = [w for levels in corpus.ADJECTIVES[dataset].values() for words in levels.values()
                  for w in words.train]
    templates = [t.format(noun="", adjectives="") for kind in corpus.TEMPLATES[dataset].values() for t in kind.train]
    return [*nouns, *adjectives, *templates, "a", "an", "and", ","]  # articles and the lists' joints


def vocabulary(dataset: str, class_names: tuple[str, ...]) -> tuple[str, ...]:
    """SPECIAL, then every piece a training caption of this data set can have, sorted."""
    tokenizer = text.encoder().tokenizer
    pieces = {piece for source in caption_sources(dataset, class_names) for piece in tokenizer.tokenize(source)}
    return SPECIAL + tuple(sorted(pieces - set(SPECIAL)))


@functools.cache
def _indexes(vocabulary: tuple[str, ...]) -> dict[int, int]:
    """MiniLM's id of each piece -> its index in the vocabulary."""
    tokenizer = text.encoder().tokenizer
    return {tokenizer.convert_tokens_to_ids(piece): index for index, piece in enumerate(vocabulary)}


def encode(captions: list[str], vocabulary: tuple[str, ...], max_tokens: int) -> torch.Tensor:
    """Captions -> (B, L) indexes: [CLS], the pieces (cut after max_tokens - 1), [SEP], then [PAD]."""
    tokenizer = text.encoder().tokenizer
    indexes = _indexes(vocabulary)
    rows = []
    for caption, ids in zip(captions, tokenizer(captions, add_special_tokens=False)["input_ids"]):
        unknown = [i for i in ids if i not in indexes]
        if unknown:
            piece = tokenizer.convert_ids_to_tokens(unknown[0])
            raise GenfastError(f"caption {caption[:60]!r} has the word piece {piece!r}, which this captioner's "
                               f"vocabulary lacks")
        rows.append([BOS, *(indexes[i] for i in ids[:max_tokens - 1]), EOS])
    tokens = torch.full((len(rows), max(map(len, rows))), PAD)
    for padded, row in zip(tokens, rows):
        padded[:len(row)] = torch.tensor(row)
    return tokens


def detokenize(pieces: list[str]) -> str:
    """Word pieces -> text: "##" pieces join the piece before, punctuation sits as the corpus writes it
    (tests/test_captioner.py checks the round trip on the corpus's captions)."""
    words = ""
    for previous, piece in zip([None, *pieces], pieces):
        if piece.startswith("##"):
            words += piece[2:]
        elif previous is None or piece in NO_SPACE_BEFORE or previous in NO_SPACE_AFTER:
            words += piece
        else:
            words += " " + piece
    return words


def decode_text(tokens: torch.Tensor, vocabulary: tuple[str, ...]) -> list[str]:
    """(B, L) indexes -> captions: each row's pieces up to its [SEP]."""
    captions = []
    for row in tokens.tolist():
        row = row[:row.index(EOS)] if EOS in row else row
        captions.append(detokenize([vocabulary[i] for i in row if i >= len(SPECIAL)]))
    return captions


def attribute_names(config: CaptionerConfig) -> tuple[str, ...]:
    """The attributes its captions have words for (none for a data set without a corpus)."""
    if not corpus.covers(config.dataset, config.class_names):
        return ()
    return tuple(corpus.ADJECTIVES[config.dataset])


def training_captions(config: CaptionerConfig, images: torch.Tensor, labels: torch.Tensor,
                      seed: int) -> tuple[list[str], torch.Tensor]:
    """A caption of each training image, drawn by `seed` (the corpus's, or a phrasing of its class name),
    and the levels its attribute words stand on: (B, A) int8, -1, 0 or +1 per attribute_names."""
    labels = labels.cpu()
    rng = random.Random(f"genfast-captioner-{seed}")
    names = attribute_names(config)
    if not names:
        phrasings = text.captions(config.dataset, config.class_names)
        captions = [rng.choice(phrasings[label]) for label in labels.tolist()]
        return captions, torch.zeros(len(labels), 0, dtype=torch.int8)
    # corpus.captions_for, keeping the levels it measures for the probe's loss.
    levels = attributes.training_thresholds(config.dataset).levels(attributes.measure(images), labels)
    table = torch.stack([levels[name] for name in names], 1)
    return [corpus.caption(config.dataset, label, dict(zip(names, row)), rng, "train")
            for label, row in zip(labels.tolist(), table.tolist())], table


# --- the network ---------------------------------------------------------------------------------

def judge_config(config) -> ClassifierConfig:
    """The judge's config, which a captioner's or clip model's config carries as JSON (checked like any header)."""
    try:
        values = json.loads(config.classifier_config) if config.classifier_config else None
    except ValueError:
        values = None
    if not isinstance(values, dict):
        raise GenfastError("this model's classifier_config is missing or damaged (not a JSON object); it is filled "
                           "in when training starts (a file without one is damaged or was edited)")
    judge = configlib.from_dict(ClassifierConfig, values)
    check_bounds(judge, "classifier config")
    return judge


def judge_weights(config, train_set) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Before a new run: the config changes naming the judge (`classifier`, default the shipped
    classifier-<data set>) and its weights, checked against the data set's images."""
    name = config.classifier or f"classifier-{train_set.name}"
    judge = checkpoint.load_part(name, "classifier", "classifier", train_set)
    return ({"classifier": str(name), "classifier_config": json.dumps(judge.config)},
            {key: value.float() for key, value in judge.modules["classifier"].items()})


PIXEL_CHANNELS = 32  # of the trained convolutions on the pixels beside the judge's map


class ImageReader(nn.Module):
    """[-1, 1] images (B, C, H, W) -> (B, P, width) tokens: one per cell of a trained stride-2 convolution
    over the frozen judge's map and a map of the pixels' own, then the judge's features projected
    (module docstring). The pixels' map (two trained stride-2 convolutions, to the judge map's size)
    is there because the judge's map is made to tell classes apart, and loses what some attribute
    words need: without it, texture words were right 69% of the time, brightness words 85%."""

    def __init__(self, config, width: int):
        super().__init__()
        judge = judge_config(config)
        self.judge = ClassifierNet(judge).requires_grad_(False)
        self.pixels = nn.Sequential(nn.Conv2d(judge.channels, PIXEL_CHANNELS // 2, 3, 2, 1), nn.ReLU(inplace=True),
                                    nn.Conv2d(PIXEL_CHANNELS // 2, PIXEL_CHANNELS, 3, 2, 1), nn.ReLU(inplace=True))
        self.cells = nn.Conv2d(judge.channels_2 + PIXEL_CHANNELS, width, 3, 2, 1)
        self.summary = nn.Linear(judge.features, width)
        self.tokens = ((judge.image_size // 4 + 1) // 2) ** 2 + 1

    def train(self, mode: bool = True) -> ImageReader:
        super().train(mode)
        self.judge.eval()  # frozen, BatchNorm statistics included
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            maps = self.judge.body(images)
            features = self.judge.features_of(maps)
        cells = self.cells(torch.cat([maps, self.pixels(images)], 1))
        return torch.cat([cells.flatten(2).transpose(1, 2), self.summary(features)[:, None]], 1)


class CaptionerNet(nn.Module):
    """(images, pieces so far) -> the next piece's logits, after a prefix of image tokens."""

    def __init__(self, c: CaptionerConfig):
        super().__init__()
        self.encoder = ImageReader(c, c.n_embd)
        self.prefix_tokens, self.max_tokens = self.encoder.tokens, c.max_tokens
        self.wte = nn.Embedding(len(c.vocabulary), c.n_embd)
        self.wpe = nn.Embedding(self.prefix_tokens + c.max_tokens, c.n_embd)  # image tokens, [CLS], pieces
        self.drop = nn.Dropout(c.dropout)
        # The ar package's block, causal: it reads only these four fields of its config.
        block = ARConfig(n_head=c.n_head, n_embd=c.n_embd, dropout=c.dropout, objective="causal")
        self.blocks = nn.ModuleList(Block(block) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd)
        self.head = nn.Linear(c.n_embd, len(c.vocabulary), bias=False)
        # The class and each attribute's third from the image tokens' mean: a training signal only
        # (Captioner.train_step).
        self.num_classes, self.attributes = c.num_classes, len(attribute_names(c))
        self.probe = nn.Linear(c.n_embd, c.num_classes + 3 * self.attributes)
        for module in (self.wte, self.wpe, self.blocks, self.head):
            module.apply(_gpt_init)

    def prefix(self, images: torch.Tensor) -> torch.Tensor:
        """(B, P, width): the image's tokens."""
        return self.encoder(images)

    def logits(self, prefix: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The full pass (no cache): logits at every token position ((B, L, V); position i predicts token i + 1)."""
        x = torch.cat([prefix, self.wte(tokens)], 1)
        x = self.drop(x + self.wpe(torch.arange(x.shape[1], device=x.device)))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x[:, self.prefix_tokens:]))

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training's pass: the pieces' logits (as `logits`), and the probe's logits of the class (B, K)
        and of each attribute's third (B, A, 3)."""
        prefix = self.prefix(images)
        probe = self.probe(prefix.mean(1))
        return (self.logits(prefix, tokens), probe[:, :self.num_classes],
                probe[:, self.num_classes:].view(len(probe), self.attributes, 3))

    def step(self, x: torch.Tensor, cache: DynamicCache, positions: torch.Tensor) -> torch.Tensor:
        """Logits of new positions (embeddings x at `positions`), reading and extending `cache`."""
        x = x + self.wpe(positions)
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer, positions)
        return self.head(self.ln_f(x))


def _gpt_init(module: nn.Module) -> None:  # GPT-2's initialisation, as the ar transformer's
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def _choose(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """The next piece of each row: the likeliest (temperature 0), or drawn at `temperature`; never
    [PAD] or [CLS], which only the input has."""
    logits = logits.float().index_fill(-1, torch.tensor([PAD, BOS], device=logits.device), -math.inf)
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(logits.device)


@torch.inference_mode()
def decode(net: CaptionerNet, images: torch.Tensor, temperature: float = 0.0,
           generator: torch.Generator | None = None, cached: bool = True) -> torch.Tensor:
    """(B, L) piece indexes of each image's caption (L <= max_tokens; after a row's [SEP], [PAD]),
    piece by piece over the KV cache (`cached`), or recomputing the whole sequence every piece (the
    reference the cache must equal). The loop ends when every row has said [SEP]."""
    prefix = net.prefix(images)
    batch, device = len(prefix), prefix.device
    tokens = torch.full((batch, 1), BOS, device=device)
    cache = DynamicCache()
    if cached:
        logits = net.step(torch.cat([prefix, net.wte(tokens)], 1), cache,
                          torch.arange(net.prefix_tokens + 1, device=device))[:, -1]
    else:
        logits = net.logits(prefix, tokens)[:, -1]
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    for length in range(1, net.max_tokens + 1):
        chosen = _choose(logits, temperature, generator).masked_fill(done, PAD)
        tokens = torch.cat([tokens, chosen[:, None]], 1)
        done |= chosen == EOS
        if bool(done.all()) or length == net.max_tokens:
            break
        if cached:
            position = torch.tensor([net.prefix_tokens + length], device=device)
            logits = net.step(net.wte(chosen[:, None]), cache, position)[:, -1]
        else:
            logits = net.logits(prefix, tokens)[:, -1]
    return tokens[:, 1:]


# --- the family ----------------------------------------------------------------------------------

class Captioner(Family):
    name = "captioner"
    generative = False
    config_class = CaptionerConfig
    presets = PRESETS
    optimizer_keys = ("lr", "weight_decay")

    def model_name(self, config: CaptionerConfig) -> str:
        return "captioner"

    def prepare(self, config: CaptionerConfig, train_set) -> tuple[CaptionerConfig, dict]:
        """Before a new run: the data set's name and classes, the word pieces of its captions, and the judge
        its image reader starts from."""
        changes, judge = judge_weights(config, train_set)
        config = configlib.override(config, changes | {"dataset": train_set.name, "class_names": train_set.class_names,
                                                       "vocabulary": vocabulary(train_set.name, train_set.class_names)})
        return config, {"captioner": {f"encoder.judge.{key}": value for key, value in judge.items()}}

    def build(self, config: CaptionerConfig) -> dict[str, nn.Module]:
        require(config, positive=("n_layer", "n_head", "n_embd", "batch_size", "lr", "max_tokens"),
                non_negative=("weight_decay", "probe_loss"), unit=("dropout",))
        if config.n_embd % config.n_head:
            raise GenfastError(f"n_embd ({config.n_embd}) must be a multiple of n_head ({config.n_head})")
        if not config.conditional or config.num_classes < 2:
            raise GenfastError("a captioner needs a labelled data set with at least 2 classes: captions name the class")
        if len(config.vocabulary) <= len(SPECIAL) or config.vocabulary[:len(SPECIAL)] != SPECIAL:
            raise GenfastError("this captioner config has no vocabulary of word pieces; it is filled in when "
                               "training starts (a file without one is damaged or was edited)")
        return {"captioner": CaptionerNet(config)}

    def optimizers(self, modules: dict[str, nn.Module], config: CaptionerConfig) -> dict[str, torch.optim.Optimizer]:
        trained = [p for p in modules["captioner"].parameters() if p.requires_grad]  # not the judge's
        return {"captioner": torch.optim.AdamW(trained, lr=config.lr, weight_decay=config.weight_decay)}

    def train_step(self, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                   images: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator,
                   config: CaptionerConfig) -> dict[str, float]:
        optimizer = optimizers["captioner"]
        trained = optimizer.param_groups[0]["params"]
        seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))  # this step's captions
        captions, levels = training_captions(config, images, labels, seed)
        tokens = encode(captions, config.vocabulary, config.max_tokens).to(images.device)
        logits, class_logits, level_logits = modules["captioner"](images, tokens[:, :-1])
        targets = tokens[:, 1:]
        caption_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=PAD)
        # The class is one noun of a caption and an attribute at most one word, said half the time, so
        # their gradients alone train the encoder slowly: a probe of the image tokens learns both
        # directly, and the captions' nouns and words come right in fewer steps.
        probe_loss = F.cross_entropy(class_logits, labels)
        if levels.shape[1]:
            probe_loss = probe_loss + F.cross_entropy(level_logits.reshape(-1, 3),
                                                      (levels.long() + 1).reshape(-1).to(images.device))
        loss = caption_loss + config.probe_loss * probe_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        said = targets != PAD
        right = (logits.argmax(-1) == targets)[said].float().mean()
        return {"loss": loss.item(), "loss_caption": caption_loss.item(), "loss_probe": probe_loss.item(),
                "piece_accuracy": right.item()}

    def caption(self, modules: dict[str, nn.Module], config: CaptionerConfig, images: torch.Tensor,
                temperature: float = 0.0, generator: torch.Generator | None = None,
                batch_size: int = 500) -> list[str]:
        """[-1, 1] images -> one caption each (greedy unless a temperature is given), in eval mode."""
        net = modules["captioner"]
        was_training = net.training
        net.eval()
        device = next(net.parameters()).device
        captions = [caption for start in range(0, len(images), batch_size)
                    for caption in decode_text(decode(net, images[start:start + batch_size].to(device), temperature,
                                                      generator).cpu(), config.vocabulary)]
        net.train(was_training)
        return captions

    def evaluate(self, modules: dict[str, nn.Module], config: CaptionerConfig, images: torch.Tensor,
                 labels: torch.Tensor) -> dict[str, float]:
        """The greedy captions of a held-out split, scored (caption_scores.scores)."""
        return caption_scores.scores(config.dataset, config.class_names, self.caption(modules, config, images),
                                     images, labels)

    def inference_modules(self) -> tuple[str, ...]:
        return ("captioner",)

    def describe(self, config: CaptionerConfig, test: dict[str, float]) -> str:
        summary = f"captions of {config.dataset} in {len(config.vocabulary) - len(SPECIAL)} word pieces"
        shown = {"class_accuracy": "class accuracy", "attribute_accuracy": "attribute accuracy", "bleu4": "BLEU-4"}
        scores = [f"{label} {test[key]:.3f}" for key, label in shown.items() if key in test]
        return summary + (", test " + ", ".join(scores) if scores else "")
