"""The machine's measured peak, and bench's rows held against it."""

import json
from pathlib import Path

import pytest
import torch

from genfast import bench, machine, peak, pretrained

from test_cli import run


def test_the_probe_measures_every_precision_and_kind_briefly():
    measured = peak.measure()
    expected = {"fp32 matmul", "fp32 conv", "bf16 matmul", "bf16 conv"}
    pytest.importorskip("onnxruntime")  # the int8 products are ONNX Runtime's (the int8 engine's kernels)
    assert set(measured.gflops) == expected | {"int8 matmul"}
    assert all(rate > 0 for rate in measured.gflops.values())
    assert measured.device == "cpu" and 0 < measured.seconds < 30
    assert measured.line().startswith("measured peak GFLOP/s") and "bf16 conv" in measured.line()


def test_a_row_is_held_to_its_precisions_peak_of_its_kind_else_the_other_kind():
    probe = peak.Peak("cpu", {"fp32 matmul": 100.0, "fp32 conv": 80.0, "int8 matmul": 200.0}, 1.0)
    assert probe.of("fp32", "conv") == ("fp32 conv", 80.0)
    assert probe.of("int8", "conv") == ("int8 matmul", 200.0)  # int8 has matrix products only
    assert probe.of("bf16", "conv") is None
    assert [bench.computes_in(e) for e in ("eager", "fused+bf16+compile", "int8-inductor", "fp16+cudagraph")] == [
        "fp32", "bf16", "int8", "fp16"]


def test_useful_work_is_counted_on_the_eager_call(tiny_gan):
    sampler = pretrained.load(tiny_gan)
    work = bench.useful_work(sampler)
    assert work.kind == "conv" and work.flops > 0
    # Counted per image: the same whatever the batch the counter ran on.
    parameters = sum(p.numel() for p in sampler.module.parameters())
    assert work.flops > 2 * parameters  # each weight is used at least once per image (convolutions: many times)


def test_bench_header_and_json_carry_the_machine_and_its_peak(tiny_gan, tmp_path: Path, capsys):
    status, out, err = run(capsys, "bench", tiny_gan, "--engines", "eager", "bf16", "--batch-sizes", 2,
                           "--repeats", 2, "--json", tmp_path / "b.json", "-q")
    assert status == 0, err
    here = machine.current()
    assert here.describe() in out and "measured peak GFLOP/s" in out
    document = json.loads((tmp_path / "b.json").read_text())
    assert document["machine"]["cpu"] == here.cpu and document["machine"]["flags"] == list(here.flags)
    assert document["machine"]["threads"] == torch.get_num_threads()
    assert all(rate > 0 for rate in document["peak"]["gflops"].values())
    eager, bf16 = document["rows"]
    assert eager["gflops"] > 0 and eager["peak"] == "fp32 conv" and eager["peak_fraction"] > 0
    assert bf16["peak"] == "bf16 conv"
    assert eager["peak_fraction"] == pytest.approx(eager["gflops"] / document["peak"]["gflops"]["fp32 conv"])
    assert f"{eager['peak_fraction']:.1%} fp32 conv" in out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_gpu_peak_names_the_gpu_and_its_half_precisions():
    measured = peak.measure("cuda")
    assert measured.device == torch.cuda.get_device_name()
    assert {"bf16 matmul", "fp16 matmul", "int8 matmul"} <= set(measured.gflops)
    assert measured.gflops["bf16 matmul"] > measured.gflops["fp32 matmul"] > 0


def test_an_ar_images_useful_work_is_a_kv_decodes_whatever_the_strategy(tiny_ar):
    from torch.utils.flop_counter import FlopCounterMode

    sampler = pretrained.load(tiny_ar)
    naive, kv = sampler.with_decoding("naive"), sampler.with_decoding("kv")
    assert bench.useful_work(naive) == bench.useful_work(kv)
    with FlopCounterMode(display=False) as counter:
        naive(naive.noise(2, 0), naive.labels(2))
    assert counter.get_total_flops() / 2 > bench.useful_work(kv).flops  # naive recomputes the prefix every step
