"""The throughput benchmark runs the engine's loop and the bare step on the same iterations."""
import pytest

from iou_aware_retinanet.benchmarks import throughput

from .engine_helpers import SHAPES_CONFIG, fresh_datasets_root, tiny_opts  # noqa: F401 (autouse fixture)


def test_steady_state_and_fixed_cost_by_hand():
    # 2 s for 10 iterations, 6 s for 30: 0.2 s per iteration, 0 s fixed; 3 s for 10 iterations: 1 s fixed.
    assert throughput.steady_and_fixed(2.0, 6.0, 10, 30) == pytest.approx((0.2, 0.0))
    assert throughput.steady_and_fixed(3.0, 7.0, 10, 30) == pytest.approx((0.2, 1.0))


def test_throughput_compares_engine_and_bare_steps(tmp_path, capsys):
    result = throughput.main(
        ["--config-file", SHAPES_CONFIG, "--short", "2", "--iters", "4", "--rounds", "1",
         *tiny_opts(tmp_path, **{"DATALOADER.CACHE_IMAGES": True})]
    )  # fmt: skip
    assert len(result["engine"]) == len(result["in_memory"]) == len(result["ratios"]) == 1
    (e_iter, _), (m_iter, _) = result["engine"][0], result["in_memory"][0]
    assert result["ratio"] == pytest.approx(e_iter / m_iter)
    printed = capsys.readouterr().out
    assert "ratio engine / in memory" in printed and "| engine (do_train) |" in printed
    assert "DATALOADER.CACHE_IMAGES True" in printed and "engine start-up" in printed


def test_short_must_be_shorter_than_iters(tmp_path):
    with pytest.raises(SystemExit):
        throughput.main(["--config-file", SHAPES_CONFIG, "--short", "4", "--iters", "4", *tiny_opts(tmp_path)])
