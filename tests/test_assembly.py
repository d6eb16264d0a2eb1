"""The host-side assembly of one logging step, on hand-made numbers: no torch, no training."""

import math

import numpy as np
import pytest

from tbdiag.contract import schema
from tbdiag.summary.assembly import Assembler, ParamLayout, remap_rows

COL = schema.COLUMN_INDEX
LAYERS = ["conv", "relu", "fc"]  # "relu" has no parameters


def _layout():
    # conv.weight (12 elements), conv.bias (3), fc.weight (6)
    return ParamLayout(rows=np.array([0, 0, 2]), numels=np.array([12.0, 3.0, 6.0]),
                       tags=["conv.weight", "conv.bias", "fc.weight"])


def _assemble(assembler, items, nonfinite=None, step=0, lrs=(0.1,)):
    return assembler.assemble(step, items, {}, _layout(), LAYERS, nonfinite or {}, lrs)


def test_per_parameter_norms_sum_into_layer_rows():
    items = [(("w_norm", None), np.array([3.0, 4.0, 2.0])),
             (("g_norm", [0, 1, 2]), np.array([0.3, 0.4, 0.6])),
             (("u_norm", [0, 1, 2]), np.array([0.03, 0.04, 0.002])),
             (("act", 0), np.array([0.5, 2.0, 0.0])),
             (("dead", 0), np.array([1.0, 0.0, 0.0, 0.0])),
             (("sat", 2), np.array([0.25]))]
    record = _assemble(Assembler(), items)
    h = record.health
    assert h.shape == (3, len(schema.COLUMNS)) and h.dtype == np.float32
    assert h[0, COL["weight_norm"]] == pytest.approx(5.0)  # sqrt(3^2 + 4^2)
    assert h[0, COL["grad_norm"]] == pytest.approx(0.5)
    assert h[0, COL["grad_rms"]] == pytest.approx(0.5 / math.sqrt(15))
    assert h[0, COL["update_ratio"]] == pytest.approx(0.05 / 5.0)
    assert h[2, COL["update_ratio"]] == pytest.approx(0.001)
    assert h[0, COL["grad_params"]] == 2 and h[2, COL["grad_params"]] == 1
    assert (h[0, COL["act_mean"]], h[0, COL["act_std"]]) == (0.5, 2.0)
    assert h[0, COL["dead_frac"]] == pytest.approx(0.25) and h[2, COL["saturated_frac"]] == pytest.approx(0.25)
    assert np.isnan(h[1]).all(), "a layer without parameters or measurements stays unmeasured"
    assert np.isnan(h[0, COL["changed"]]), "no previous logging step to compare with"
    scalars = dict(record.scalars)
    assert scalars["train/grad_norm"] == pytest.approx(math.sqrt(0.09 + 0.16 + 0.36))
    assert scalars["train/lr/group0"] == 0.1


def test_changed_compares_with_the_previous_logging_step():
    assembler = Assembler()
    grads = (("g_norm", [0, 1, 2]), np.array([1.0, 1.0, 1.0]))
    _assemble(assembler, [(("w_norm", None), np.array([3.0, 4.0, 2.0])), grads])
    h = _assemble(assembler, [(("w_norm", None), np.array([3.5, 4.0, 2.0])), grads], step=10).health
    assert h[0, COL["changed"]] == pytest.approx(0.5)  # one of conv's two tensors moved
    assert h[2, COL["changed"]] == 0.0  # fc did not move although it got gradients: frozen


def test_dead_units_persist_only_when_dead_in_three_logged_batches():
    assembler = Assembler()
    masks = [[1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 1, 0], [0, 1, 0, 0]]  # unit 0: dead in the first three only
    persisted = [assembler.dead_fractions(0, np.array(m, float))[1] for m in masks]
    assert persisted == [0.5, 0.25, 0.25, 0.0]


def test_nonfinite_gradients_count_as_received_and_poison_the_global_norm():
    items = [(("w_norm", None), np.array([1.0, 1.0, 1.0])), (("g_norm", [0, 2]), np.array([np.nan, 2.0]))]
    record = _assemble(Assembler(), items, nonfinite={("g_norm", 0): 5.0})
    h = record.health
    assert h[0, COL["grad_nonfinite"]] == 5 and h[0, COL["grad_params"]] == 1
    assert math.isnan(dict(record.scalars)["train/grad_norm"])


def test_histograms_and_images_get_their_tags():
    items = [(("p_hist", [0, 2]), np.zeros(18)), (("a_hist", [2]), np.zeros(4)),
             (("image", 0), np.zeros((2, 4, 4)))]
    meta = {"p_hist": ([12, 6], [1.0, 1.0]), "a_hist": ([4], [1.0])}
    record = Assembler().assemble(0, items, meta, _layout(), LAYERS, {})
    (p_tags, _, lengths, _, numels), (a_tags, *_) = record.histogram_samples
    assert p_tags == ["params/conv.weight", "params/fc.weight"] and lengths == [12, 6] and numels == [12, 6]
    assert a_tags == ["activations/fc"]
    assert [tag for tag, _ in record.images] == ["images/conv"]


def test_histograms_binned_on_the_device_keep_their_rows_with_the_scale_put_in():
    binned = np.array([[0.0, 1.0, 3.0, 1.0], [-1.0, 2.0, 0.0, 6.0]], dtype=np.float32)  # min, max, 2 bins
    items = [(("g_hist", [0, 2]), binned), (("model", "softmax_output"), np.array([1.0]))]
    meta = {"g_hist": ([4, 6], [3.0, 1.0])}
    record = Assembler().assemble(0, items, meta, _layout(), LAYERS, {})
    assert record.histogram_samples == []
    ((tags, rows, numels),) = record.histogram_rows
    assert tags == ["grads/conv.weight", "grads/fc.weight"] and numels == [12, 6]
    np.testing.assert_array_equal(rows, [[0, 1, 3, 3, 1], [-1, 2, 1, 0, 6]])
    assert record.model == {"softmax_output": 1.0}


def test_remap_rows_renumbers_layer_keyed_items_only():
    items = [(("act", 0), 1), (("a_hist", [0, 2]), 2), (("g_norm", [0, 1]), 3), (("image", 2), 4)]
    remapped = remap_rows(items, [2, 0, 1])
    assert [key for (_, key), _ in remapped] == [2, [2, 1], [0, 1], 1]


def test_no_scalars_when_asked():
    items = [(("g_norm", [0]), np.array([1.0]))]
    assert Assembler().assemble(0, items, {}, _layout(), LAYERS, {}, [0.1], scalars=False).scalars == []
