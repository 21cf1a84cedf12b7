"""benchmarks/paper_forks.py: the plumbing that times the paper's forks beside masktrain.

The paper's code is not part of this repository, so a stand-in checkout is written here: forks
with the paper's file names and call convention ``fork((x * keep, keep, [1]))`` that compute
masktrain's function. The real forks are compared in docs/layer_masking.md."""
from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import paper_forks  # noqa: E402

FORK = textwrap.dedent('''
    import torch, torchvision
    from masktrain.layer_masking import layer_mask

    class Fork(torch.nn.Module):
        """Stand-in for a paper fork: a torchvision {name} that takes (x * keep, keep, it)."""
        def __init__(self, scale):
            super().__init__()
            self.net = torchvision.models.{name}()
            self.scale = scale
        def load_state_dict(self, state, strict=True):
            return self.net.load_state_dict(state, strict=strict)
        def forward(self, inputs):
            if isinstance(inputs, torch.Tensor):
                return self.net(inputs)
            x, keep, it = inputs
            assert it == [1], it
            return layer_mask(self.net)(x, keep) * self.scale

    def {name}():
        return Fork({scale})
''')


def _checkout(root: Path, scale: float = 1.0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "sal_layers.py").write_text("")
    for arch, (module, constructor, _) in paper_forks.FORKS.items():
        (root / f"{module}.py").write_text(FORK.format(name=constructor, scale=scale))
    return root


def test_a_directory_without_the_forks_is_one_message(tmp_path):
    with pytest.raises(SystemExit) as exc:
        paper_forks.check_paper_path(tmp_path)
    assert "not a checkout of SriramB-98/layer_masking" in str(exc.value)
    assert "sal_resnet.py" in str(exc.value)


@pytest.mark.parametrize("scale, expect_equal", [(1.0, True), (1.5, False)])
def test_compare_times_three_models_and_measures_the_logit_difference(tmp_path, monkeypatch, scale, expect_equal):
    path = _checkout(tmp_path / f"paper{scale}", scale)
    for module in ("sal_resnet", "efficientnet", "densenet"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.syspath_prepend(str(path))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 32, 32, generator=g)
    keep = (torch.rand(1, 1, 32, 32, generator=g) > 0.5).float()
    calls = []

    def timed(fn):
        calls.append(fn)
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    out = paper_forks.compare_all(["resnet50", "convnext_tiny"], path, (x, keep), 2, timed)
    assert list(out) == ["resnet50"]  # convnext_tiny: no fork, named and skipped
    r = out["resnet50"]
    assert len(calls) == 3 * 2
    assert all(v > 0 for k, v in r.items() if k != "rel_err")
    if expect_equal:
        assert r["rel_err"] < 1e-6
    else:
        assert r["rel_err"] == pytest.approx(1 / 3, rel=1e-4)  # |1.5y - y| / |1.5y|
