"""When checkpoints are written (``faults.FiniteLossCheckpoints``), the rule both front-ends follow."""
import pytest

from iou_aware_retinanet.faults import FiniteLossCheckpoints


def _run(max_iter, period, finite_losses):
    """Drive the rule as a front-end does: iteration i's loss is finite iff i in finite_losses;
    a non-finite loss stops the run before its step."""
    written = []
    rule = FiniteLossCheckpoints(period, max_iter, snapshot=lambda i: f"state after {i}",
                                 write=lambda name, i, state: written.append((name, i, state)))
    for iteration in range(max_iter):
        if iteration not in finite_losses:
            break
        rule.loss_was_finite()
        rule.after_step(iteration)
    return written


def test_periodic_checkpoint_waits_for_the_next_finite_loss_and_final_follows_the_last_step():
    assert _run(5, 2, finite_losses=range(5)) == [
        ("model_0000001", 1, "state after 1"),  # written during iteration 2
        ("model_0000003", 3, "state after 3"),  # during iteration 4
        ("model_final", 4, "state after 4"),
    ]


def test_a_checkpoint_whose_next_loss_is_not_finite_is_never_written():
    assert _run(8, 2, finite_losses={0, 1, 2, 3}) == [("model_0000001", 1, "state after 1")]


def test_a_checkpoint_due_at_the_end_is_superseded_by_model_final():
    assert _run(4, 2, finite_losses=range(4)) == [("model_0000001", 1, "state after 1"), ("model_final", 3, "state after 3")]


def test_period_must_be_positive():
    with pytest.raises(ValueError, match="period"):
        FiniteLossCheckpoints(0, 10, snapshot=lambda i: None, write=lambda *a: None)
