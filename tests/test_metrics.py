import numpy as np
import pandas as pd
import pytest

from rmge.tl import expected_calibration_error, transfer_metrics

# Five cells, two classes. Confidences and correctness (worked out by hand):
#   0.95 right -> bin (0.9, 1.0]    0.85 right -> bin (0.8, 0.9]
#   0.70 right -> bin (0.6, 0.7]    0.65 wrong -> bin (0.6, 0.7]    0.60 wrong -> bin (0.5, 0.6]
# ECE = 1/5*|1-0.95| + 1/5*|1-0.85| + 2/5*|0.5-0.675| + 1/5*|0-0.6| = 0.01 + 0.03 + 0.07 + 0.12 = 0.23
TRUTH = ["a", "a", "b", "b", "a"]
PROBA = np.array([[0.95, 0.05], [0.85, 0.15], [0.3, 0.7], [0.65, 0.35], [0.4, 0.6]])


def test_ece_hand_computed():
    assert expected_calibration_error(TRUTH, PROBA, classes=["a", "b"]) == pytest.approx(0.23)


def test_ece_one_bin_is_gap_between_accuracy_and_mean_confidence():
    # 3 of 5 right, mean confidence 3.75 / 5 = 0.75
    assert expected_calibration_error(TRUTH, PROBA, classes=["a", "b"], n_bins=1) == pytest.approx(0.15)


def test_ece_accepts_dataframe_and_ignores_missing_truth():
    df = pd.DataFrame(PROBA, columns=["a", "b"])
    assert expected_calibration_error(TRUTH, df) == pytest.approx(0.23)
    # an extra cell without a true label changes nothing
    df2 = pd.concat([df, pd.DataFrame([[0.99, 0.01]], columns=["a", "b"])], ignore_index=True)
    assert expected_calibration_error([*TRUTH, None], df2) == pytest.approx(0.23)


def test_ece_perfectly_calibrated_and_confident_cases():
    # always sure and always right -> 0
    proba = np.eye(3)[[0, 1, 2, 1]]
    assert expected_calibration_error([0, 1, 2, 1], proba, classes=[0, 1, 2]) == pytest.approx(0.0)
    # always sure and always wrong -> 1
    assert expected_calibration_error([1, 2, 0, 0], proba, classes=[0, 1, 2]) == pytest.approx(1.0)


def test_ece_matches_torchmetrics_on_random_data():
    torch = pytest.importorskip("torch")
    tm = pytest.importorskip("torchmetrics.functional.classification")
    rng = np.random.default_rng(0)
    proba = rng.dirichlet(np.full(4, 0.7), size=500)
    truth = rng.integers(0, 4, size=500)
    expected = tm.multiclass_calibration_error(
        torch.as_tensor(proba), torch.as_tensor(truth), num_classes=4, n_bins=15, norm="l1"
    ).item()
    assert expected_calibration_error(truth, proba, classes=[0, 1, 2, 3], n_bins=15) == pytest.approx(expected)


def test_ece_bad_input_errors():
    with pytest.raises(ValueError, match="pass `classes=`"):
        expected_calibration_error(TRUTH, PROBA)
    with pytest.raises(ValueError, match="sum to 1"):
        expected_calibration_error(TRUTH, PROBA * 2, classes=["a", "b"])
    with pytest.raises(ValueError, match="5 labels but `proba` has 4 rows"):
        expected_calibration_error(TRUTH, PROBA[:4], classes=["a", "b"])
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error(TRUTH, PROBA, classes=["a", "b"], n_bins=0)
    with pytest.raises(ValueError, match="3 classes"):
        expected_calibration_error(TRUTH, PROBA, classes=["a", "b", "c"])


# Nine query cells; "X" is a query-only type and one cell has no label: both are not scored.
# "R" is a reference-only class, predicted once (for a C cell).
Q_TRUTH = ["A", "A", "A", "B", "B", "C", "C", "X", None]
Q_PRED = ["A", "A", "B", "B", "A", "C", "R", "A", "B"]
CLASSES = ["A", "B", "C", "R"]


def test_transfer_metrics_hand_computed():
    m = transfer_metrics(Q_TRUTH, Q_PRED, classes=CLASSES)
    assert m["n_scored"] == 7 and m["n_excluded"] == 2
    assert m["accuracy"] == pytest.approx(4 / 7)
    # F1: A = 2/3 (2 TP, 1 FP, 1 FN), B = 1/2, C = 2/3 (1 TP, 0 FP, 1 FN); R adds no column
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)
    # recalls: A 2/3, B 1/2, C 1/2
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1 / 2) / 3)
    assert "ece" not in m


def test_transfer_metrics_takes_classes_from_proba_and_scores_ece_on_scored_cells():
    rng = np.random.default_rng(1)
    proba = pd.DataFrame(rng.dirichlet(np.ones(4), size=len(Q_TRUTH)), columns=CLASSES)
    m = transfer_metrics(Q_TRUTH, Q_PRED, proba=proba)
    assert m["n_scored"] == 7
    assert m["accuracy"] == pytest.approx(4 / 7)
    keep = [t in CLASSES for t in Q_TRUTH]
    expected = expected_calibration_error(np.array(Q_TRUTH, dtype=object)[keep], proba[keep])
    assert m["ece"] == pytest.approx(expected)
    # same numbers with an array plus explicit classes
    m2 = transfer_metrics(Q_TRUTH, Q_PRED, proba=proba.to_numpy(), classes=CLASSES)
    assert m2 == pytest.approx(m)


def test_transfer_metrics_falls_back_to_predicted_classes():
    # without classes or proba, the reference classes are the predicted labels {A, B, R, C}
    m = transfer_metrics(Q_TRUTH, Q_PRED)
    assert m["n_scored"] == 7


def test_transfer_metrics_perfect_and_pandas_input():
    truth = pd.Series(["x", "y", "y"], dtype="category")
    m = transfer_metrics(truth, np.array(["x", "y", "y"]), classes=["x", "y"])
    assert m["accuracy"] == m["macro_f1"] == m["balanced_accuracy"] == 1.0


def test_transfer_metrics_nothing_to_score_gives_nan():
    m = transfer_metrics(["q", "q"], ["a", "b"], classes=["a", "b"])
    assert m["n_scored"] == 0 and np.isnan(m["accuracy"]) and np.isnan(m["macro_f1"])


def test_transfer_metrics_errors():
    with pytest.raises(ValueError, match="`y_true` has 9 labels but `y_pred` has 2"):
        transfer_metrics(Q_TRUTH, ["A", "B"])
    with pytest.raises(ValueError, match="sum to 1"):
        transfer_metrics(Q_TRUTH, Q_PRED, proba=np.full((9, 4), 0.5), classes=CLASSES)
    with pytest.raises(TypeError, match="one-dimensional"):
        transfer_metrics(pd.DataFrame({"a": Q_TRUTH}), Q_PRED)
