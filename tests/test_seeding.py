"""Per-sample randomness: a report does not depend on the batch size or on the number of ranks."""
import json

import pytest
import torch

from masktrain.data.shapes import ShapesDataset
from masktrain.evaluation import evaluate
from masktrain.models import create_model
from masktrain.reports import _jsonable
from masktrain.rng import sample_random

K, SIZE, N = 4, 32, 37  # 37: not divisible by the batch sizes or the world size
PROBES = ["object_removal", "shape_only", "linear_probe", "missingness_curve"]
METHODS = ["noise", "random_colour"]
OPTIONS = {"shape_only": {"donors": ["noise", "grey"], "n_permutations": 50},
           "linear_probe": {"folds": 2, "n_permutations": 50},
           "missingness_curve": {"fractions": [0.0, 0.5, 1.0]}}


def _report(batch_size: int) -> dict:
    torch.manual_seed(0)
    model = create_model("test_resnet", K)
    ds = ShapesDataset("test", length=N, image_size=SIZE, num_classes=K)
    return evaluate(model, ds, PROBES, METHODS, num_classes=K, mean=(0.5, 0.5, 0.5), batch_size=batch_size, n_boot=50,
                    options=OPTIONS)


def _numbers(report: dict) -> dict:
    """Everything of report.json that is a result (not timing, not the configuration that differs on purpose)."""
    data = json.loads(json.dumps(_jsonable(report)))
    return {"probes": data["probes"], "clean": data["clean_accuracy"], "flags": data["flags"]}


def assert_same(a, b, path="report"):
    """Equal, except floats within 1e-6 relative: the model's logits differ in their last bits with the
    batch a row is in (different kernels), which moves continuous values such as prediction entropy
    by ~1e-8. Every count, prediction-based value and interval must agree; a different random draw
    would change predictions, and with them these numbers, by far more."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{path}: {a!r} != {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-9), f"{path}: {a!r} != {b!r}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def test_sample_random_rows_do_not_depend_on_the_batch():
    rows = torch.arange(20)
    whole = sample_random(3, "probe", "key", rows).rand((20, 3, 4, 4))
    parts = torch.cat([sample_random(3, "probe", "key", r).rand((len(r), 3, 4, 4)) for r in torch.split(rows, 7)])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole, sample_random(3, "probe", "other", rows).rand((20, 3, 4, 4)))
    assert not torch.equal(whole, sample_random(4, "probe", "key", rows).rand((20, 3, 4, 4)))
    again = sample_random(3, "probe", "key", rows)
    first, second = again.rand((20, 5)), again.rand((20, 5))
    assert not torch.equal(first, second)  # successive draws are new numbers
    assert 0.4 < float(whole.mean()) < 0.6 and float(whole.min()) >= 0 and float(whole.max()) < 1


@pytest.mark.slow
def test_report_is_the_same_for_batch_size_7_and_256():
    small, large = _report(7), _report(256)
    assert_same(_numbers(small), _numbers(large))


def _ddp_worker(rank: int, world: int, init_file: str, result_file: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        report = _report(8)
        if rank == 0:
            torch.save(report, result_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_report_is_the_same_on_one_and_two_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "ddp.pt")), nprocs=2, join=True)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=False)
    assert ddp["config"]["world_size"] == 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: the same kernels, so the same float sums
    try:
        single = _report(8)
    finally:
        torch.set_num_threads(threads)
    assert_same(_numbers(ddp), _numbers(single))
