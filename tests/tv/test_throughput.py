"""The throughput benchmark runs the engine's loop and the bare step on the same iterations."""
from iou_aware_retinanet.benchmarks import throughput

from .engine_helpers import SHAPES_CONFIG, fresh_datasets_root, tiny_opts  # noqa: F401 (autouse fixture)


def test_throughput_compares_engine_and_bare_steps(tmp_path, capsys):
    result = throughput.main(["--config-file", SHAPES_CONFIG, "--iters", "3", "--rounds", "1", *tiny_opts(tmp_path)])
    assert len(result["engine_s"]) == len(result["in_memory_s"]) == 1
    assert result["ratio"] == result["engine_s"][0] / result["in_memory_s"][0] > 0
    printed = capsys.readouterr().out
    assert "ratio engine / in memory" in printed and "| engine (do_train) |" in printed
