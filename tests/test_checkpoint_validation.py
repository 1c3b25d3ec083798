"""Model checkpoints are checked whole before anything is applied.

A sparsified model checks every budgeted weight's entry (storage consistency, shape, seed range,
decay factor in [0, 1], finite values) before any of its modules loads, so a bad entry in a later
layer leaves the earlier layers as they were; ``strict=False`` never leaves a half-loaded weight.
The property tests mutate valid state dicts at random: each mutation is either refused with the
model unchanged, or loads into a consistent model.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_same_tensor, batches, make, train
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import procrustes_kernels as pk
from procrustes_kernels import BlockStorage


def _trained(seed=3, steps=3):
    model = make("cnn", seed=seed)
    opt = pk.Procrustes(model.parameters(), lr=0.05, budget=0.2, momentum=0.9, init_decay=0.8)
    train(model, opt, batches("cnn", steps, seed=seed), steps)
    return model


def _same_model(a, b):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert_same_tensor(x, y, name)


def _consistent(model):
    """Every budgeted weight's storage is valid, its values finite, and the model computes (a
    finite but huge loaded value may still overflow the outputs: that is the checkpoint's)."""
    for _, w in pk.budgeted_weights(model):
        BlockStorage(w.shape, w.block_size, w.values, w.bits, w.group_ptr)  # validates
        assert w.nnz == int(w.storage.mask().sum())
        assert 0.0 <= w.scale_value <= 1.0 and 0 <= w.seed < 2**63
        assert bool(torch.isfinite(w.effective()).all())
    x, _ = batches("cnn", 1)[0]
    assert model(x).shape == (x.shape[0], 5)


# ----------------------------------------------------------------------------- whole-model check
@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda w: setattr(w, "_scale_value", 5.0), "decay factor"),
        (lambda w: setattr(w, "_scale_value", float("nan")), "decay factor"),
        (lambda w: setattr(w, "seed", -5), "seed in"),
        (lambda w: setattr(w, "seed", 2**70), "seed in"),
        (lambda w: setattr(w, "group_ptr", w.group_ptr + 1), "group"),
        (lambda w: setattr(w, "values", w.values[:-1]), "values"),
        (lambda w: w.values.__setitem__(0, float("nan")), "finite"),
    ],
    ids=["scale_5", "scale_nan", "seed_negative", "seed_huge", "pointers", "values", "nan"],
)
def test_a_bad_entry_in_the_last_layer_leaves_every_layer_unchanged(mutate, match):
    model = _trained(seed=3)
    before = copy.deepcopy(model)
    sd = copy.deepcopy(_trained(seed=4).state_dict())
    last = [k for k in sd if pk.is_budgeted(sd[k])][-1]
    mutate(sd[last])
    with pytest.raises(RuntimeError, match=match) as err:
        model.load_state_dict(sd)
    assert "nothing was loaded" in str(err.value)
    _same_model(model, before)  # the first layers did not load either


def test_a_shape_mismatch_loads_nothing():
    model, other = _trained(seed=3), _trained(seed=4)
    before = copy.deepcopy(model)
    sd = other.state_dict()
    sd["5.bias"] = torch.zeros(7)
    with pytest.raises(RuntimeError, match="size mismatch for '5.bias'"):
        model.load_state_dict(sd)
    _same_model(model, before)


def test_a_good_checkpoint_loads_every_layer():
    model, other = _trained(seed=3), _trained(seed=4)
    model.load_state_dict(other.state_dict())
    _same_model(model, other)


def test_strict_false_loads_whole_weights_or_nothing():
    model, other = _trained(seed=3), _trained(seed=4)
    before = copy.deepcopy(model)
    sd = other.state_dict()
    missing = [k for k in sd if pk.is_budgeted(sd[k])][1]
    del sd[missing]
    result = model.load_state_dict(sd, strict=False)
    assert result.missing_keys == [missing]
    for key, value in model.state_dict().items():
        want = before.state_dict()[key] if key == missing else other.state_dict()[key]
        assert_same_tensor(value, want, key)
    _consistent(model)


def test_a_copied_or_pickled_model_keeps_the_check():
    model = copy.deepcopy(_trained(seed=3))
    sd = copy.deepcopy(_trained(seed=4).state_dict())
    key = [k for k in sd if pk.is_budgeted(sd[k])][-1]
    sd[key]._scale_value = 2.0
    before = copy.deepcopy(model)
    with pytest.raises(RuntimeError, match="decay factor"):
        model.load_state_dict(sd)
    _same_model(model, before)


# ------------------------------------------------------------------------------ property tests
def _mutations():
    """(entry index, what, how): a random change of a budgeted entry or of the dict."""
    value = st.one_of(
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=True, allow_infinity=True, width=32),
    )
    return st.tuples(
        st.integers(0, 2),
        st.sampled_from(
            ["seed", "scale", "bound", "value", "drop_value", "bit", "pointer", "delete", "dense"]
        ),
        value,
        st.integers(0, 10_000),
    )


def _apply(sd, mutation):
    which, what, value, pos = mutation
    keys = [k for k in sd if pk.is_budgeted(sd[k])]
    key = keys[which % len(keys)]
    w = sd[key]
    if what == "seed":
        w.seed = int(value) if isinstance(value, int) else value
    elif what == "scale":
        w._scale_value = float(value)
    elif what == "bound":
        w.bound = float(value)
    elif what == "value" and w.values.numel():
        w.values[pos % w.values.numel()] = float(value)
    elif what == "drop_value" and w.values.numel():
        w.values = w.values[:-1]
    elif what == "bit":
        bits = w.bits.clone()
        i = pos % (bits.numel() * 8)
        bits[i // 8] ^= 1 << (i % 8)
        w.bits = bits
    elif what == "pointer":
        ptr = w.group_ptr.clone()
        ptr[pos % ptr.numel()] += 1 if value != 0 else -1
        w.group_ptr = ptr
    elif what == "delete":
        del sd[key]
    elif what == "dense":
        sd[key] = w.effective() + 1.0
    return key


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,  # the same examples on every run (CI included)
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(mutation=_mutations(), strict=st.booleans())
def test_a_mutated_checkpoint_is_refused_unchanged_or_loads_consistently(mutation, strict):
    trained, state = _pair()
    model, sd = copy.deepcopy(trained), copy.deepcopy(state)
    before = copy.deepcopy(model)
    key = _apply(sd, mutation)
    try:
        model.load_state_dict(sd, strict=strict)
    except (ValueError, TypeError, RuntimeError) as e:
        if "Missing key" in str(e):
            # torch's strict check, made after loading the rest: every weight is whole
            assert strict and key not in sd
            _consistent(model)
        else:
            _same_model(model, before)
        return
    _consistent(model)
    if key in sd:  # what loaded is the (valid) entry
        got = model.state_dict()[key]
        assert torch.equal(got.effective(), sd[key].effective())
    # a step works on the loaded model, or (outputs overflowed by a huge loaded value) is refused
    # with nothing changed
    opt = pk.Procrustes(model.parameters(), lr=0.05, budget=0.2)
    x, y = batches("cnn", 1)[0]
    F.cross_entropy(model(x), y).backward()
    loaded = copy.deepcopy(model)
    try:
        opt.step()
    except FloatingPointError:
        _same_model(model, loaded)
    _consistent(model)


@functools.cache
def _pair():
    """A trained model and the state dict of another (built once, copied by each example)."""
    return _trained(seed=3), copy.deepcopy(_trained(seed=4).state_dict())


def test_a_model_of_sparse_layers_gets_the_check_from_sparsify():
    def build(seed):
        model = torch.nn.Sequential(
            pk.SparseLinear(6, 5, seed=seed), torch.nn.ReLU(), pk.SparseLinear(5, 3, seed=seed + 1)
        )
        return pk.sparsify(model, filter=lambda *_: False)  # converts nothing, adds the check

    model, other = build(1), build(7)
    before = copy.deepcopy(model)
    sd = copy.deepcopy(other.state_dict())
    sd["2.weight"]._scale_value = -1.0
    with pytest.raises(RuntimeError, match="decay factor"):
        model.load_state_dict(sd)
    _same_model(model, before)
    assert model[0].weight.seed == before[0].weight.seed != other[0].weight.seed
