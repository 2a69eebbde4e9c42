"""`--engine auto`: the fastest stack within tolerance, decided on this machine, cached, said in one line.

Test engines are registered by monkeypatching the registry, and the candidate lists are cut
to them, so that nothing here compiles or exports: the decisions take a second or less.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import genfast
from genfast import bulk, checkpoint, engines, images, machine, metrics
from genfast.engines import auto, rewrap
from genfast.errors import GenfastWarning

from test_cli import run

SLOW_S = 0.05  # what the test's slowed reference pays per call: several times a batch of 4's own time


def slowed(by: float):
    """An engine: the same network and pixels, `by` seconds later."""
    def engine(sampler):
        def fn(noise, labels=None):
            time.sleep(by)
            return sampler(noise, labels)
        return rewrap(sampler, sampler.module, fn)
    return engine


def noisy(sampler):
    """An engine faster than any: no network at all, just noise where the images should be."""
    def fn(noise, labels=None):
        return torch.rand(len(noise), *sampler.image_shape) * 2 - 1
    return rewrap(sampler, sampler.module, fn)


def unslowed(sampler):
    """An engine: the sampler's network called directly, without the test's delay: exact, and faster."""
    return rewrap(sampler, sampler.module)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "cache" / "auto.json"
    monkeypatch.setenv("GENFAST_AUTO_CACHE", str(path))
    monkeypatch.setattr(auto, "TIMING_S", 0.2)
    return path


@pytest.fixture
def candidates(monkeypatch):
    """Register the test engines; returns a function that sets the candidate list."""
    for name, engine in (("slowed", slowed(2 * SLOW_S)), ("noisy", noisy), ("unslowed", unslowed)):
        monkeypatch.setitem(engines.ENGINES, name, engine)

    def use(*names):
        monkeypatch.setattr(auto, "ONE_CALL_CANDIDATES", ("eager", *names))
    return use


def slow_reference(name="gan-mnist"):
    """A shipped model whose eager sampler waits SLOW_S per call, so that `unslowed` is faster."""
    sampler = genfast.load(name)
    return dataclasses.replace(sampler, fn=slowed(SLOW_S)(sampler).fn)


def test_auto_picks_the_fastest_stack_within_tolerance_never_a_slowed_or_a_noisy_one(cache, candidates):
    candidates("slowed", "noisy", "unslowed")
    sampler = slow_reference()
    fast, choice = auto.resolve(sampler, 4, engines.apply, budget_s=30)
    trials = {t.engine: t for t in choice.decision.trials}
    assert choice.engine == "unslowed" and fast.info["engine"] == "unslowed", auto.table(choice.decision)
    assert trials["noisy"].status.startswith("over tolerance: max pixel diff") and trials["noisy"].max_abs_diff > 0.5
    assert trials["slowed"].kept and trials["slowed"].images_per_s < trials["eager"].images_per_s
    noise = sampler.noise(4, 5)
    assert torch.equal(fast(noise), sampler(noise))
    line = choice.line()
    assert line.startswith("auto: unslowed (") and "x eager at batch 4 here, max pixel diff 0" in line
    assert f"cached in {cache}" in line and "\n" not in line

    # Without a faster exact stack, the slowed and the noisy ones still lose: eager stays.
    candidates("slowed", "noisy")
    fast, choice = auto.resolve(sampler, 4, engines.apply, budget_s=30, fresh=True)
    assert choice.engine == "eager" and fast.info["engine"] == "eager"
    assert "no other stack was 1.05x faster within tolerance at batch 4 here (2 tried)" in choice.line()


def test_a_stack_that_changes_the_class_is_refused_by_the_judge(cache, candidates, monkeypatch):
    """Within any pixel bound it is given, a stack whose images the judge puts in other classes is refused."""
    def relabelled(sampler):
        return rewrap(sampler, sampler.module, lambda noise, labels: sampler(noise, (labels + 1) % 10))

    monkeypatch.setitem(engines.ENGINES, "relabelled", relabelled)
    monkeypatch.setitem(engines.TOLERANCES, "relabelled", engines.Tolerance(float("inf"), float("inf"), 0.02))
    candidates("relabelled", "unslowed")
    _, choice = auto.resolve(slow_reference("cgan-mnist"), 64, engines.apply, budget_s=30)
    trials = {t.engine: t for t in choice.decision.trials}
    assert trials["relabelled"].status.startswith("over tolerance: class accuracy")
    assert trials["relabelled"].accuracy_drop > 0.5 and trials["unslowed"].accuracy_drop == 0
    assert choice.engine == "unslowed"


def test_the_budget_bounds_a_decision_and_a_known_slow_build_is_not_started(cache, candidates, monkeypatch):
    builds = []

    def slow_to_build(sampler):
        builds.append(1)
        time.sleep(0.5)
        return unslowed(sampler)

    monkeypatch.setitem(engines.ENGINES, "slow-to-build", slow_to_build)
    candidates("slow-to-build", "unslowed")
    sampler = slow_reference()
    _, choice = auto.resolve(sampler, 8, engines.apply, budget_s=0.3)
    trials = {t.engine: t for t in choice.decision.trials}
    assert trials["slow-to-build"].status.startswith("one-off 0.") and "ran past the time budget" in \
        trials["slow-to-build"].status
    assert trials["unslowed"].status == "not tried: the time budget was spent"
    assert not choice.decision.complete and choice.engine == "eager"
    # Deciding again (another bucket, or afresh): the build known to take 0.5 s is not started.
    _, choice = auto.resolve(sampler, 8, engines.apply, budget_s=0.3, fresh=True)
    status = {t.engine: t.status for t in choice.decision.trials}["slow-to-build"]
    assert status.startswith("not tried: its one-off took 0.") and len(builds) == 1
    # A compilation never seen here is expected to take seconds: not started with one second left.
    candidates("compile")
    _, choice = auto.resolve(sampler, 8, engines.apply, budget_s=1.0)
    status = {t.engine: t.status for t in choice.decision.trials}["compile"]
    assert status.startswith(f"not tried: building it takes about {auto.BUILD_PRIOR_S['compile']:.1f} s"), status


def test_the_slow_fid_check_refuses_a_stack_whose_fid_is_2_percent_worse(cache, candidates, monkeypatch):
    def fid(sampler, n, **kwargs):  # genfast eval's FID, as it would come out for each stack
        return {"fid": 10.0 if sampler.info["engine"] == "eager" else 10.5}

    monkeypatch.setattr(metrics, "evaluate", fid)
    candidates("unslowed")
    _, choice = auto.resolve(slow_reference(), 8, engines.apply, budget_s=30, check_fid=100)
    unslowed_trial = {t.engine: t for t in choice.decision.trials}["unslowed"]
    assert unslowed_trial.status == "over tolerance: FID +5.0% against eager's" and choice.engine == "eager"
    assert choice.decision.fid_n == 100


def test_the_cache_key_changes_with_torch_cpu_flags_threads_settings_and_batch_bucket(monkeypatch):
    sampler = genfast.load("gan-mnist")
    here = machine.current()
    keys = {"here": auto.cache_key(sampler, 64)}
    assert auto.cache_key(sampler, 33) == keys["here"]  # the same power-of-two bucket
    keys["batch"] = auto.cache_key(sampler, 65)
    keys["cfg"] = auto.cache_key(sampler, 64, {"cfg": 2.0})
    for what, other in (("torch", {"torch": "9.9.9"}), ("flags", {"flags": (*here.flags, "amx_bf16")}),
                        ("threads", {"threads": here.threads + 1}), ("onnxruntime", {"onnxruntime": "0.0.1"}),
                        ("cpu", {"cpu": "another CPU"})):
        monkeypatch.setattr(machine, "current", lambda device=None, other=other: dataclasses.replace(here, **other))
        keys[what] = auto.cache_key(sampler, 64)
    monkeypatch.undo()
    keys["model"] = auto.cache_key(genfast.load("gan-fashion-mnist"), 64)
    assert len(set(keys.values())) == len(keys), keys


def test_a_changed_model_file_is_decided_again_and_a_warm_cache_decides_at_once(cache, candidates, tmp_path):
    candidates("noisy")
    model = tmp_path / "model.safetensors"
    shutil.copy(checkpoint.resolve("gan-mnist"), model)
    _, first = auto.resolve(genfast.load(model), 8, engines.apply, budget_s=30)
    assert "decided in" in first.line()
    start = time.perf_counter()
    _, warm = auto.resolve(genfast.load(model), 8, engines.apply, budget_s=30)
    assert time.perf_counter() - start < 1.0 and f"cached in {cache}" in warm.line()
    shutil.copy(checkpoint.resolve("gan-fashion-mnist"), model)  # the same name, other weights
    _, again = auto.resolve(genfast.load(model), 8, engines.apply, budget_s=30)
    assert "decided in" in again.line()
    assert len(json.loads(cache.read_text())["decisions"]) == 2


def test_a_damaged_cache_is_ignored_with_one_line_and_rewritten(cache, candidates, tiny_gan, tmp_path, capsys,
                                                                monkeypatch):
    candidates("noisy")
    sampler = genfast.load("gan-mnist")
    cache.parent.mkdir(parents=True)
    cache.write_text("{not json")
    with pytest.warns(GenfastWarning, match="ignoring the engine decisions in .* which are damaged"):
        _, choice = auto.resolve(sampler, 8, engines.apply, budget_s=30)
    assert choice.engine == "eager"
    entries = json.loads(cache.read_text())["decisions"]  # rewritten whole
    assert len(entries) == 1
    # A damaged entry in a good file: that decision alone is made again.
    key, = entries
    entries[key]["trials"][0]["images_per_s"] = "fast"
    cache.write_text(json.dumps({"decisions": entries}))
    with pytest.warns(GenfastWarning, match="ignoring a damaged engine decision"):
        _, choice = auto.resolve(sampler, 8, engines.apply, budget_s=30)
    assert "decided in" in choice.line()

    # On the command line: one warning line, then the work done.
    cache.write_text("[1, 2")
    monkeypatch.setattr(auto, "SMALL_JOB_S", 0.0)
    status, _, err = run(capsys, "sample", tiny_gan, "-n", 4, "--out", tmp_path / "g.png")
    lines = err.splitlines()  # then the progress bar
    assert status == 0 and lines[0].startswith("genfast: warning: ignoring the engine decisions in"), err
    assert lines[1].startswith("auto: eager (") and err.count("genfast: warning") == 1, err


def test_sample_defaults_to_auto_says_its_choice_and_eager_gives_todays_images(cache, candidates, tiny_gan,
                                                                               tmp_path, capsys, monkeypatch):
    from genfast.cli import build_parser

    defaults = {argv[0]: build_parser().parse_args(argv) for argv in
                (["sample", "m", "--out", "g.png"], ["serve", "m"], ["eval", "m"])}
    assert {name: args.engine for name, args in defaults.items()} == {"sample": "auto", "serve": "auto",
                                                                     "eval": "eager"}
    candidates("noisy")
    status, out, err = run(capsys, "sample", tiny_gan, "-n", 6, "--seed", 2, "--out", tmp_path / "auto.png")
    assert status == 0 and "wrote a grid of 6 images" in out
    assert err.startswith("auto: eager (6 images take about ") and "too few to pay for a decision" in err, err
    assert not cache.exists()  # nothing decided, nothing cached
    monkeypatch.setattr(auto, "SMALL_JOB_S", 0.0)
    status, _, err = run(capsys, "sample", tiny_gan, "-n", 6, "--seed", 2, "--out", tmp_path / "auto.png")
    assert status == 0 and err.startswith("auto: ") and err.count("auto: ") == 1 and "decided in" in err, err
    assert cache.exists()
    status, _, err = run(capsys, "sample", tiny_gan, "-n", 6, "--seed", 2, "--out", tmp_path / "quiet.png", "-q")
    assert status == 0 and err == ""  # --quiet: no notes

    # --engine eager: exactly the images the eager sampler makes (the Python API's), byte for byte.
    status, _, err = run(capsys, "sample", tiny_gan, "-n", 6, "--seed", 2, "--engine", "eager", "--out",
                         tmp_path / "eager.png")
    assert status == 0 and "auto" not in err
    images.save_grid(genfast.load(tiny_gan).generate(6, seed=2), tmp_path / "api.png")
    assert (tmp_path / "eager.png").read_bytes() == (tmp_path / "api.png").read_bytes()

    status, _, err = run(capsys, "sample", tiny_gan, "--engine", "fused+auto", "--out", tmp_path / "x.png")
    assert status == 2 and "'auto' chooses the whole stack itself" in err
    with pytest.raises(genfast.GenfastError, match="'auto' must come last"):
        engines.apply(genfast.load(tiny_gan), "auto+fused")


def test_bulk_decides_once_records_the_stack_and_a_resumed_job_keeps_it(cache, candidates, tiny_cgan, tmp_path,
                                                                        capsys, monkeypatch):
    candidates("unslowed")
    monkeypatch.setattr(auto, "SMALL_JOB_S", 0.0)
    out = tmp_path / "shards"
    status, _, err = run(capsys, "sample", tiny_cgan, "-n", 24, "--format", "npz", "--shard-size", 8, "--out", out)
    assert status == 0 and err.splitlines()[0].startswith("auto: "), err
    manifest = json.loads((out / bulk.MANIFEST).read_text())
    stack = err.split()[1]
    assert manifest["complete"] and manifest["engine"] == "auto" and manifest["engine_stack"] == stack

    # Run again: nothing is decided (the folder says which stack its shards came from).
    def no_decision(*args, **kwargs):
        raise AssertionError("a resumed job decided again")

    monkeypatch.setattr(auto, "resolve", no_decision)
    status, out_text, err = run(capsys, "sample", tiny_cgan, "-n", 24, "--format", "npz", "--shard-size", 8,
                                "--out", out)
    assert status == 0 and "(24 were already there)" in out_text
    assert f"auto: {stack} (the stack {out}'s first images were made with" in err, err


def test_serve_decides_at_start_up_and_names_the_stack(cache, candidates, tiny_gan, capsys):
    pytest.importorskip("fastapi")
    from genfast.serve import ServeOptions, create_app

    candidates("noisy")
    app = create_app([str(tiny_gan)], ServeOptions(engine="auto", max_batch=8))
    err = capsys.readouterr().err
    key = tiny_gan.parent.name
    assert err.startswith(f"{key}: auto: eager (") and "decided in" in err, err
    assert app.state.batchers[key].sampler.info["engine"] == "eager"


def test_tune_prints_every_candidate_and_sample_then_uses_its_decision(cache, candidates, tiny_gan, tmp_path,
                                                                       capsys, monkeypatch):
    candidates("slowed", "noisy")
    status, out, err = run(capsys, "tune", tiny_gan, "--batch-sizes", 3, "--budget", 30)
    assert status == 0, err
    assert "batch 3 (measured at 4, its bucket), on " in out and "| engine | status | one-off s |" in out
    assert "| noisy | over tolerance: max pixel diff" in out and "| slowed | kept |" in out
    assert "auto: eager (no other stack was 1.05x faster within tolerance at batch 4 here (2 tried)" in out
    monkeypatch.setattr(auto, "SMALL_JOB_S", 0.0)
    status, _, err = run(capsys, "sample", tiny_gan, "-n", 3, "--batch-size", 3, "--out", tmp_path / "g.png")
    assert status == 0 and f"cached in {cache}" in err, err
    status, _, err = run(capsys, "tune", tiny_gan, "--budget", 0)
    assert status == 1 and "--budget must be more than 0 seconds" in err


def test_the_registry_engine_decides_per_batch_bucket(cache, candidates, tiny_gan):
    candidates("noisy")
    sampler = genfast.load(tiny_gan)
    fast = engines.apply(sampler, "auto")
    noise = sampler.noise(16, 1)
    assert torch.equal(fast(noise[:3]), sampler(noise[:3])) and torch.equal(fast(noise), sampler(noise))
    assert fast.info["engine"] == "auto" and fast.info["auto"] == {4: "eager", 16: "eager"}
    assert len(json.loads(cache.read_text())["decisions"]) == 2


def test_grid_pixels_of_auto_stay_within_the_chosen_stacks_tolerance(cache, candidates, tiny_gan, tmp_path, capsys,
                                                                     monkeypatch):
    """Whatever auto picks, the grid is the eager grid within that stack's pixel bound."""
    monkeypatch.setattr(auto, "ONE_CALL_CANDIDATES", ("eager", "fused", "bf16"))
    monkeypatch.setattr(auto, "SMALL_JOB_S", 0.0)
    status, _, err = run(capsys, "sample", tiny_gan, "-n", 16, "--out", tmp_path / "auto.png")
    assert status == 0, err
    chosen = err.split()[1]
    run(capsys, "sample", tiny_gan, "-n", 16, "--engine", "eager", "--out", tmp_path / "eager.png")
    a, b = (np.asarray(Image.open(tmp_path / f"{x}.png")).astype(int) for x in ("auto", "eager"))
    assert np.abs(a - b).max() <= 255 / 2 * auto.tolerance(chosen).max_abs + 1  # pixels in [-1, 1] -> 0..255


def test_a_kv_model_is_decided_over_the_static_decode_which_draws_its_tokens(cache, tiny_ar, monkeypatch):
    """kv has no fixed part for compile or onnx to take; static draws the same tokens with one,
    so auto decides over static's stacks: onnx is tried and kept, and the images stay kv's."""
    pytest.importorskip("onnxruntime")
    monkeypatch.setattr(auto, "LOOP_CANDIDATES", ("eager", "onnx"))
    sampler = genfast.load(tiny_ar)
    assert sampler.module.decode == "kv"
    fast, choice = auto.resolve(sampler, 4, engines.apply, budget_s=120)
    assert choice.decision.about["settings"]["decode"] == "static" and choice.decision.trial("onnx").kept
    assert choice.line().startswith(f"auto: {choice.engine} (decoding static, kv's tokens; ")
    assert fast.module.decode == "static"
    noise, labels = sampler.noise(4, 2), sampler.labels(4)
    assert torch.equal(fast(noise, labels), sampler(noise, labels))
