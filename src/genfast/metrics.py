"""FID, KID and class accuracy: how good a generator's images are, judged by a classifier.

No Inception weights exist offline, so the judge is the small CNN trained on the
same data set (families/classifier.py): its 256-feature penultimate layer is the
space in which FID and KID compare generated images with the held-out test split,
and its predictions give the class accuracy of conditional samples. The share of
that layer's units that are zero on every test image is reported with every score:
a dead unit is a dimension FID does not see.

Features are computed once per image set (and put in units of the test split's
RMS, a constant per data set); torchmetrics then computes FID and KID from them
(its `feature=` module is a pass-through that announces the feature width), which
lets the bootstrap below reuse the same features instead of running the network
again. Every number is printed beside the same metric for real training images
against the test split, which gives it a scale.

A text-conditioned model is also judged on prompts (`prompt_accuracy`): whether the
judge finds the prompt's class in its images, for phrasings it was trained on and for
held-out ones (the caption corpus's, corpus.py), and whether attribute words move the
attribute they name, measured from the pixels (attributes.py); and by a clip model
(`clip_score`), which needs no class in the prompt.

A model that makes no images (a classifier, a captioner, a clip model) is judged by its
family's own scores on the test split (`evaluate_held_out`).
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from genfast import attributes, checkpoint, corpus, data, images, pretrained, seeding
from genfast.devices import resolve_device
from genfast.errors import GenfastError
from genfast.families import Sampler
from genfast.families.ar import text
from genfast.families.classifier import dead_share
from genfast.families.clip import image_embeddings, text_embeddings

# torchmetrics warns that KID keeps every feature in memory: 10,000 x 256 doubles is 20 MB.
warnings.filterwarnings("ignore", message="Metric `Kernel Inception Distance` will save all extracted features")

BOOTSTRAP_ROUNDS = 10
KID_SUBSET = 1000
CORPUS_PROMPTS_PER_CLASS = 2  # class-only prompts judged per class and split (of 18 held-out, 120 training)


class PassThrough(nn.Module):
    """torchmetrics' feature= module for features computed beforehand."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


@dataclass
class Judge:
    """A trained classifier, as feature network and labeller of one data set."""

    net: nn.Module
    dataset: str
    name: str
    test_accuracy: float | None

    @property
    def num_features(self) -> int:
        return self.net.num_features

    @property
    def min_samples(self) -> int:
        # A covariance of d features needs well over d samples to be full rank.
        return 2 * self.num_features

    @torch.inference_mode()
    def embed(self, batches: Iterable[torch.Tensor], total: int, desc: str,
              progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """[-1, 1] image batches -> (features (N, d) float64, predicted classes (N,))."""
        device = next(self.net.parameters()).device
        features, predictions = [], []
        with tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar:
            for batch in batches:
                f = self.net.features(batch.to(device))
                features.append(f.double().cpu())
                predictions.append(self.net.head(f).argmax(1).cpu())
                bar.update(len(batch))
        return torch.cat(features), torch.cat(predictions)


def load_judge(dataset: str, classifier: str | None = None, device: str = "cpu",
               image_shape: tuple[int, ...] | None = None) -> Judge:
    """The shipped classifier of `dataset`, or the given checkpoint (which must be of that data
    set and, when given, see images of `image_shape`)."""
    name = classifier or f"classifier-{dataset}"
    try:
        ckpt = checkpoint.load(name)
    except GenfastError:
        if classifier:
            raise
        raise GenfastError(f"no feature network for data set '{dataset}'; train one with "
                           f"'genfast train classifier --data {dataset} --out DIR' and pass --classifier "
                           f"DIR/checkpoint.safetensors") from None
    if ckpt.family != "classifier":
        raise GenfastError(f"{name} is a '{ckpt.family}' checkpoint, not a classifier")
    if ckpt.dataset["name"] != dataset:
        raise GenfastError(f"the feature network {name} was trained on '{ckpt.dataset['name']}', the model on "
                           f"'{dataset}'; FID needs one trained on '{dataset}' (--classifier)")
    if image_shape is not None and tuple(ckpt.dataset["image_shape"]) != tuple(image_shape):
        raise GenfastError(f"the feature network {name} sees images of shape {tuple(ckpt.dataset['image_shape'])}, "
                           f"the model makes {tuple(image_shape)}; train a classifier on the same image size")
    _, _, modules = pretrained.load_modules(ckpt, resolve_device(device))
    return Judge(modules["classifier"].eval(), dataset, str(name), ckpt.extra.get("test", {}).get("accuracy"))


def _batches(pixels: torch.Tensor, batch_size: int) -> Iterable[torch.Tensor]:
    """uint8 images -> [-1, 1] float batches."""
    for start in range(0, len(pixels), batch_size):
        yield images.to_float(pixels[start:start + batch_size])


def _in_real_units(real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Divide both sets by the RMS of the real features, so that KID's cubic kernel stays well
    conditioned: the classifier's ReLU features are sparse and large (RMS ~5 on MNIST). For a
    fixed real set (the test split) this divides FID by a constant, so FID's orders and ratios
    hold; KID's cubic kernel is not scale-free, so KIDs compare only within this convention."""
    scale = real.pow(2).mean().sqrt()
    return real / scale, fake / scale


def _frechet(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID between two feature sets already in real units, via torchmetrics."""
    from torchmetrics.image.fid import FrechetInceptionDistance  # 3 s to import: only when a distance is taken

    fid = FrechetInceptionDistance(feature=PassThrough(real.shape[1]))
    fid.update(real, real=True)
    fid.update(fake, real=False)
    return float(fid.compute())


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID alone (in the units of `fid_kid`'s)."""
    return _frechet(*_in_real_units(real, fake))


def fid_kid(real: torch.Tensor, fake: torch.Tensor, seed: int = 0) -> dict[str, float]:
    """FID and KID (mean and std over subsets) between two feature sets, via torchmetrics."""
    from torchmetrics.image.kid import KernelInceptionDistance  # 3 s to import: only when a distance is taken

    real, fake = _in_real_units(real, fake)
    d = real.shape[1]
    kid = KernelInceptionDistance(feature=PassThrough(d), subset_size=min(KID_SUBSET, len(real), len(fake)))
    kid.update(real, real=True)
    kid.update(fake, real=False)
    with torch.random.fork_rng():  # KID draws its subsets from the global generator
        seeding.seed_generator(torch.default_generator, seed, "kid-subsets")
        kid_mean, kid_std = kid.compute()
    return {"fid": _frechet(real, fake), "kid": float(kid_mean), "kid_std": float(kid_std)}


def bootstrap_fid_std(real: torch.Tensor, fake: torch.Tensor, seed: int = 0,
                      rounds: int = BOOTSTRAP_ROUNDS) -> float:
    """The spread of FID when the generated set is resampled with replacement: two
    models whose FIDs differ by much less than this cannot be told apart."""
    real, fake = _in_real_units(real, fake)
    generator = seeding.generator(seed, "fid-bootstrap")
    values = []
    for _ in range(rounds):
        pick = torch.randint(0, len(fake), (len(fake),), generator=generator)
        values.append(_frechet(real, fake[pick]))
    mean = sum(values) / rounds
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (rounds - 1))


def class_accuracy(predicted: torch.Tensor, wanted: torch.Tensor, class_names: tuple[str, ...]) -> dict:
    """Overall and per-class share of images the judge puts in the class they were meant to be."""
    per_class = {}
    for index, name in enumerate(class_names):
        mask = wanted == index
        per_class[name] = float((predicted[mask] == index).double().mean()) if mask.any() else None
    return {"accuracy": float((predicted == wanted).double().mean()), "per_class_accuracy": per_class}


def _train_features(judge: Judge, train: data.ImageSet, n: int, seed: int, batch_size: int,
                    progress: bool) -> torch.Tensor:
    """The scale of every score: features of n real training images (capped by the
    split's size), picked by `seed`, to set against the same test split."""
    pick = torch.randperm(len(train), generator=seeding.generator(seed, "real-train-pick"))[:n]
    return judge.embed(_batches(train.images[pick], batch_size), len(pick), "features: train split", progress)[0]


def _check_distinct_noise(sampler: Sampler, n: int, seed: int) -> None:
    """An FID over repeated noise judges fewer samples than it says (and looks worse, or
    better, than the model is): refuse it. Equal *images* from distinct noise are the
    model's doing, and FID is there to punish them, so those are only counted."""
    copies = n - len(set(images.digests(sampler.noise(n, seed))))
    if copies:
        raise GenfastError(f"the noise of seed {seed} repeats ({copies} of its first {n} rows are copies of others), "
                           f"so an FID over it would judge fewer than {n} samples; this is a bug in the sampler's "
                           f"noise, please report it")


def _hashing(batches: Iterable[torch.Tensor], seen: set[bytes]) -> Iterable[torch.Tensor]:
    """The batches as they are, each image's uint8 hash added to `seen` on the way."""
    for batch in batches:
        seen.update(images.digests(images.to_uint8(batch)))
        yield batch


def evaluate(sampler: Sampler, n: int = 10_000, seed: int = 0, batch_size: int = 500,
             classifier: str | None = None, device: str = "cpu", progress: bool = True) -> dict:
    """Everything `genfast eval` reports, as a JSON-able dict."""
    if "dataset" not in sampler.info:
        raise GenfastError("this sampler does not say which data set it was trained on; load it with genfast.load")
    dataset = sampler.info["dataset"]
    judge = load_judge(dataset, classifier, device, sampler.image_shape)
    if n < judge.min_samples:
        raise GenfastError(f"-n {n} is too few: FID over {judge.num_features} features needs at least "
                           f"{judge.min_samples} images (10000 is the usual)")
    test = data.load(dataset, "test")
    train = data.load(dataset, "train")
    _check_distinct_noise(sampler, n, seed)
    real_test, test_predicted = judge.embed(_batches(test.images, batch_size), len(test), "features: test split",
                                            progress)
    made: set[bytes] = set()
    fake, fake_predicted = judge.embed(_hashing(sampler.batches(n, seed, batch_size=batch_size), made), n,
                                       "features: generated", progress)
    real_train = _train_features(judge, train, n, seed, batch_size, progress)
    n_real = len(real_train)

    scores = fid_kid(real_test, fake, seed)
    baseline = fid_kid(real_test, real_train, seed)
    result = {
        "model": sampler.info.get("path"), "dataset": dataset, "data_source": test.source,
        "classifier": judge.name, "classifier_test_accuracy": judge.test_accuracy,
        "classifier_dead_features": dead_share((real_test != 0).any(0)),
        "n": n, "distinct_images": len(made), "n_test": len(test), "n_real_train": n_real, "seed": seed,
        **scores, "fid_std": bootstrap_fid_std(real_test, fake, seed),
        "real_fid": baseline["fid"], "real_fid_std": bootstrap_fid_std(real_test, real_train, seed),
        "real_kid": baseline["kid"], "real_kid_std": baseline["kid_std"],
    }
    result["fid_ratio_to_real"] = result["fid"] / result["real_fid"] if result["real_fid"] > 0 else None
    if sampler.conditional:
        result.update(class_accuracy(fake_predicted, sampler.labels(n), sampler.class_names))
        real = class_accuracy(test_predicted, test.labels, test.class_names)
        result["real_accuracy"] = real["accuracy"]
    return result


def prompt_accuracy(sampler: Sampler, per_prompt: int = 50, seed: int = 0, classifier: str | None = None,
                    device: str = "cpu", progress: bool = True) -> dict:
    """For a text-conditioned model: the share of images made from a prompt that the judge puts
    in the class the prompt describes, overall and per prompt, for
    - "train_phrasings": the phrasings the model was trained on (text.captions);
    - "held_out_phrasings": text.HELD_OUT, one phrasing per class never seen in training;
    - "corpus_train", "corpus_held_out": CORPUS_PROMPTS_PER_CLASS class-only prompts per class of
      the caption corpus's training and held-out splits (corpus.py), picked by `seed`;
    - "corpus_train_attributes", "corpus_held_out_attributes": the prompts of the attribute pairs below;
    and "attribute_agreement_train", "attribute_agreement_held_out" (see `_agreement`) over
    corpus.attribute_pairs of each split: for every class and attribute with words, a prompt with
    its "low" word and the same prompt with its "high" word ("a snapshot of a black dress" / "...
    white dress"). per_prompt images each, all from the same noise of `seed`, so that within a pair
    only the word differs. The corpus's kinds are there for the data sets it speaks of
    (Fashion-MNIST, MNIST)."""
    dataset = sampler.info["dataset"]
    judge = load_judge(dataset, classifier, device, sampler.image_shape)
    result = {}
    for kind, phrasings in (("train_phrasings", text.captions(dataset, sampler.class_names)),
                            ("held_out_phrasings", text.HELD_OUT.get(dataset, []))):
        prompts = [(index, prompt) for index, prompts in enumerate(phrasings) for prompt in prompts]
        if prompts:
            result[kind] = _accuracy(_made_from(sampler, judge, prompts, per_prompt, seed, kind, progress))
    if dataset not in corpus.DATASETS or len(corpus.NOUNS[dataset]) != sampler.num_classes:
        return result
    for split in ("train", "held_out"):
        pick = random.Random(f"genfast-eval-prompts-{seed}" + ("" if split == "held_out" else f"-{split}"))
        prompts = [(index, prompt) for index, per_class in enumerate(corpus.class_prompts(dataset, split))
                   for prompt in pick.sample(per_class, CORPUS_PROMPTS_PER_CLASS)]
        result[f"corpus_{split}"] = _accuracy(_made_from(sampler, judge, prompts, per_prompt, seed,
                                                         f"corpus_{split}", progress))
        pairs = corpus.attribute_pairs(dataset, seed, split)
        made = _made_from(sampler, judge, [(p.label, prompt) for p in pairs for prompt in (p.low, p.high)],
                          per_prompt, seed, f"corpus_{split}_attributes", progress)
        result[f"corpus_{split}_attributes"] = _accuracy(made)
        result[f"attribute_agreement_{split}"] = _agreement(pairs, made, attributes.training_thresholds(dataset))
    return result


@dataclass
class _Made:
    """What per_prompt images of one prompt came to: the judge's hits and the images' attributes."""

    prompt: str
    hits: float  # share of the images the judge puts in the prompt's class
    measured: dict[str, torch.Tensor]


def _made_from(sampler: Sampler, judge: Judge, prompts: list[tuple[int, str]], per_prompt: int, seed: int,
               kind: str, progress: bool) -> list[_Made]:
    made = []
    for index, prompt in tqdm(prompts, desc=f"prompts: {kind.replace('_', ' ')}", disable=not progress):
        pixels = sampler.generate(per_prompt, seed, condition=sampler.prompt_condition(prompt, per_prompt))
        _, predicted = judge.embed([pixels], per_prompt, "", progress=False)
        made.append(_Made(prompt, float((predicted == index).double().mean()), attributes.measure(pixels)))
    return made


def _accuracy(made: list[_Made]) -> dict:
    return {"accuracy": sum(m.hits for m in made) / len(made), "per_prompt": {m.prompt: m.hits for m in made}}


def _agreement(pairs: list[corpus.AttributePair], made: list[_Made], thresholds: attributes.Thresholds) -> dict:
    """Whether a word moves the attribute it names: a pair agrees (1) when the mean measured attribute of
    the "high" prompt's images is above that of the "low" prompt's, disagrees (0) when below, and counts
    1/2 on a tie; "agreement" is the share over all pairs (1/2: the words are ignored), also per attribute.

    Pairs rather than per-image thresholds because a prompt asks for a direction, not a third of the
    training spread: a model that makes "a black dress" darker than "a white dress" honours the
    words even where all its dresses are darker than the training ones. How far they move is in
    "shift": the difference of the two means over the gap between the class's training terciles
    (1: as far apart as the lower and the upper third of the real images begin)."""
    rows = []
    for pair, low, high in zip(pairs, made[0::2], made[1::2]):
        low_mean = float(low.measured[pair.attribute].mean())
        high_mean = float(high.measured[pair.attribute].mean())
        gap = float(thresholds.high[pair.attribute][pair.label] - thresholds.low[pair.attribute][pair.label])
        rows.append({"label": pair.label, "attribute": pair.attribute, "low": pair.low, "high": pair.high,
                     "low_mean": low_mean, "high_mean": high_mean,
                     "agrees": 1.0 if high_mean > low_mean else 0.0 if high_mean < low_mean else 0.5,
                     "shift": (high_mean - low_mean) / gap if gap > 0 else None})
    per_attribute = {}
    for name in dict.fromkeys(row["attribute"] for row in rows):
        mine = [row for row in rows if row["attribute"] == name]
        shifts = [row["shift"] for row in mine if row["shift"] is not None]
        per_attribute[name] = {"agreement": sum(row["agrees"] for row in mine) / len(mine),
                               "shift": sum(shifts) / len(shifts) if shifts else None}
    return {"agreement": sum(row["agrees"] for row in rows) / len(rows), "per_attribute": per_attribute,
            "pairs": rows}


def evaluate_reconstructions(name_or_path: str, batch_size: int = 500, seed: int = 0, classifier: str | None = None,
                             device: str = "cpu", progress: bool = True) -> dict:
    """For a tokenizer (vqvae): FID and KID of the test split's round trips against the test
    split itself, beside real training images against it (the scale), and the family's
    own held-out scores (reconstruction error, PSNR, codebook usage and perplexity)."""
    ckpt = checkpoint.load(name_or_path)
    family, config, modules = pretrained.load_modules(ckpt, resolve_device(device))
    if not family.reconstructs:
        raise GenfastError(f"{name_or_path} is a {family.name}, which has no encoder to reconstruct with")
    dataset = ckpt.dataset["name"]
    judge = load_judge(dataset, classifier, device, tuple(ckpt.dataset["image_shape"]))
    test, train = data.load(dataset, "test"), data.load(dataset, "train")
    originals = images.to_float(test.images)
    real_test, _ = judge.embed(_batches(test.images, batch_size), len(test), "features: test split", progress)
    rebuilt = (family.reconstruct(modules, config, originals[i:i + batch_size], test.labels[i:i + batch_size]
                                  if test.labels is not None else None) for i in range(0, len(test), batch_size))
    fake, _ = judge.embed(rebuilt, len(test), "features: reconstructions", progress)
    real_train = _train_features(judge, train, len(test), seed, batch_size, progress)
    scores, baseline = fid_kid(real_test, fake, seed), fid_kid(real_test, real_train, seed)
    return {"model": str(name_or_path), "dataset": dataset, "classifier": judge.name,
            "classifier_dead_features": dead_share((real_test != 0).any(0)), "n": len(test),
            **scores, "fid_std": bootstrap_fid_std(real_test, fake, seed), "real_fid": baseline["fid"],
            "real_kid": baseline["kid"]} | family.evaluate(modules, config, originals, test.labels)


def evaluate_held_out(name_or_path: str, device: str = "cpu") -> dict:
    """For a model that makes no images and reconstructs none (a classifier, a captioner, a CLIP model):
    its family's own scores (Family.evaluate) on its data set's test split, the scores the trainer
    logs at every checkpoint."""
    ckpt = checkpoint.load(name_or_path)
    family, config, modules = pretrained.load_modules(ckpt, resolve_device(device))
    dataset = ckpt.dataset["name"]
    test = data.load(dataset, "test", image_size=config.image_size, channels=config.channels)
    scores = family.evaluate(modules, config, images.to_float(test.images), test.labels)
    return {"model": str(name_or_path), "family": ckpt.family, "dataset": dataset, "data_source": test.source,
            "n_test": len(test), **scores}


REAL_CLIP_IMAGES = 500  # test images whose own captions give the CLIP score its scale


def default_clip(dataset: str) -> str | None:
    """The shipped clip model of a data set, if there is one."""
    name = f"clip-{dataset}"
    return name if name in checkpoint.shipped_paths() else None


@dataclass
class ClipModel:
    """A clip model loaded for scoring a generator's images (families/clip.py)."""

    name: str
    config: object
    modules: dict[str, nn.Module]


def load_clip(name_or_path: str, sampler: Sampler, device: str = "cpu") -> ClipModel:
    """A clip model of the generator's data set and image size (checked before any work)."""
    ckpt = checkpoint.load(name_or_path)
    dataset = sampler.info["dataset"]
    if ckpt.family != "clip":
        raise GenfastError(f"--clip {name_or_path} is a '{ckpt.family}' checkpoint, not a clip model")
    if ckpt.dataset["name"] != dataset or tuple(ckpt.dataset["image_shape"]) != tuple(sampler.image_shape):
        raise GenfastError(f"--clip {name_or_path} was trained on {ckpt.dataset['name']} images, the model makes "
                           f"{dataset} images; give a clip model of {dataset}")
    _, config, modules = pretrained.load_modules(ckpt, resolve_device(device))
    return ClipModel(str(name_or_path), config, modules)


def clip_score(sampler: Sampler, prompts: dict[str, list[str]], clip: ClipModel, per_prompt: int = 50,
               seed: int = 0, progress: bool = True) -> dict:
    """For a text-conditioned model: how near its images are to their prompts in a clip model's space
    (families/clip.py; the CLIPScore idea, Hessel et al., 2021, without its rescaling): per kind of
    `prompts` (those prompt_accuracy judged, by kind), the mean over the prompts of the mean cosine
    similarity between the per_prompt images made from a prompt (the noise of `seed`, as
    prompt_accuracy's) and the prompt. It needs no class in the prompt. Beside it, its scale: "real",
    REAL_CLIP_IMAGES test images with a held-out corpus caption of their own (a caption of their
    class for a data set without a corpus), and "mismatched", the same with another image's."""
    modules = clip.modules
    result: dict = {"clip": clip.name}
    for kind, kind_prompts in prompts.items():
        per = {}
        for prompt in tqdm(kind_prompts, desc=f"clip score: {kind.replace('_', ' ')}", disable=not progress):
            pixels = sampler.generate(per_prompt, seed, condition=sampler.prompt_condition(prompt, per_prompt))
            per[prompt] = float((image_embeddings(modules, pixels) @ text_embeddings(modules, [prompt])[0]).mean())
        result[kind] = {"clip_score": sum(per.values()) / len(per), "per_prompt": per}
    return result | _real_clip_scores(modules, clip.config, seed)


def _real_clip_scores(modules: dict[str, nn.Module], config, seed: int) -> dict[str, float]:
    """The clip score of real test images with their own captions, and with those of other images."""
    test = data.load(config.dataset, "test", image_size=config.image_size, channels=config.channels)
    pick = torch.randperm(len(test), generator=seeding.generator(seed, "clip-real-pick"))[:REAL_CLIP_IMAGES]
    pixels, labels = test.images[pick], test.labels[pick]
    if corpus.covers(config.dataset, config.class_names):
        captions = corpus.captions_for(config.dataset, pixels, labels, seed, "held_out")
    else:
        captions = [text.captions(config.dataset, config.class_names)[label][0] for label in labels.tolist()]
    similarity = image_embeddings(modules, images.to_float(pixels)) @ text_embeddings(modules, captions).T
    return {"real": float(similarity.diagonal().mean()), "mismatched": float(similarity.roll(1, 1).diagonal().mean())}
