"""tools/bench_step.py: configurations timed side by side, each with what one step dispatches."""

import torch
from bench_step import Config, measure


def test_float_and_qat_steps_are_timed_interleaved_with_their_operator_counts():
    configs = [Config.parse(text, "cifar_resnet20") for text in ("fp", "w4a4")]
    results = measure(configs, batch=2, size=32, steps=2, warmup=1, device=torch.device("cpu"))
    assert [r["config"] for r in results] == ["fp", "w4a4"]
    fp, qat = results
    assert all(r["batch"] == 2 and 0 < r["min_s"] <= r["median_s"] <= r["max_s"]
               for r in results)
    # cifar_resnet20: 19 convs + 1 Linear, each with a weight and an input quantizer; the float
    # step dispatches a few hundred aten operators and each quantizer adds about a dozen
    assert 100 < fp["ops"] < qat["ops"] < fp["ops"] + 40 * 16  # 2026-11-28: + 40 * 30
