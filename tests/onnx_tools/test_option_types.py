"""issue 19 item 11: every API option is checked once, with its type, before any work.

The class: every public function of ``onnx_tools`` that takes keyword options, every option,
every kind of wrong type (a string, a bool, a float for an int, a list, an object...). Each must
raise ``OptionTypeError`` naming the function and the argument, with nothing coerced and
nothing read or written; a misspelled keyword gets "did you mean".
"""

from __future__ import annotations

import inspect
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import onnx_tools as ot
from onnx_tools.data import ImageOptions

FUNCTIONS = {name: getattr(ot, name) for name in ot.__all__
             if inspect.isfunction(getattr(ot, name))}
#: Every (function, keyword option) pair of the public API.
OPTIONS = sorted(
    (fname, pname)
    for fname, func in FUNCTIONS.items()
    for pname, p in inspect.signature(func).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
)
RECALIBRATE_EXTRA = sorted(
    ("recalibrate", pname) for pname, p in inspect.signature(ot.collect).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
)


#: The kind of every keyword option (written here, not read from the code under test): a new
#: option fails test_every_keyword_option_has_a_kind until it is given one, and is then drawn.
KINDS = {
    "an integer": {"batch_size", "num_samples", "seed"},
    "a string": {"estimator", "provider", "include", "exclude", "what", "sites_include",
                 "sites_exclude"},
    "True or False": {"bessel", "shuffle", "keep_partial", "prefetch", "progress", "in_place",
                      "linear_sites", "waves"},
    "a number": {"prior_strength", "bn_eps"},
    "a pair": {"shard"},
    "other": {"image_options", "output", "like", "labels", "input_path", "reads", "source",
              "cache_dir"},
}


def test_every_keyword_option_has_a_kind():
    assert len(OPTIONS) >= 25
    known = set().union(*KINDS.values())
    missing = sorted({p for _, p in OPTIONS + RECALIBRATE_EXTRA} - known)
    assert not missing, f"options this test does not draw wrong types for: {missing}"


class _Thing:
    def __repr__(self) -> str:
        return "<thing>"


#: Values of the wrong type for each kind of option (what a caller gets wrong).
WRONG = {
    "an integer": [st.just("64"), st.just(True), st.just(np.True_), st.floats(1, 99),
                   st.just(b"8"), st.just([64]), st.just(_Thing())],
    "a string": [st.integers(), st.just(True), st.just(b"cpu"), st.just(["population"])],
    "True or False": [st.integers(0, 1), st.just("True"), st.just("no"), st.floats(0, 1),
                      st.just(_Thing())],
    "a number": [st.just("64"), st.just(True), st.just([1.0]), st.just(_Thing())],
    "a pair": [st.just("0/2"), st.just((0.0, 2.0)), st.just((0, 1, 2)), st.just(1),
               st.just((True, 2))],
    "other": [st.just(12345), st.just(True), st.just(_Thing())],
}


def _kind(name: str) -> str:
    return next(kind for kind, names in KINDS.items() if name in names)


@st.composite
def wrong_calls(draw):
    function, name = draw(st.sampled_from(OPTIONS + RECALIBRATE_EXTRA), label="option")
    value = draw(st.one_of(WRONG[_kind(name)]), label="value")
    return function, name, value


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(call=wrong_calls())
def test_a_wrong_type_is_an_option_type_error_naming_the_argument(tmp_path_factory, call):
    function, name, value = call
    folder = tmp_path_factory.mktemp("calls")
    model, data = folder / "missing.onnx", folder / "missing.npy"
    args = {"check_output": (folder / "o.onnx",), "write_model": (None, folder / "o.onnx"),
            "compare_models": (model, model, data)}.get(function, (model, data))
    with pytest.raises(ot.OptionTypeError) as info:
        FUNCTIONS[function](*args, **{name: value})
    message = str(info.value)
    assert message.startswith(f"{function}(): {name} must be "), message
    assert "\n" not in message
    assert list(folder.iterdir()) == [], "nothing may be written"


@pytest.mark.parametrize(("function", "typo", "meant"), [
    ("apply_stats", "prior_strenght", "prior_strength"),
    ("apply_stats", "estimater", "estimator"),
    ("collect", "batchsize", "batch_size"),
    ("recalibrate", "num_sample", "num_samples"),
    ("compare_models", "label", "labels"),
    ("write_model", "inplace", "in_place"),
])
def test_unknown_keyword_gets_did_you_mean(cnn_files, function, typo, meant):
    model, data = cnn_files
    with pytest.raises(ot.OptionTypeError,
                       match=rf"^{function}\(\) got an unexpected keyword argument '{typo}'; "
                             rf"did you mean '{meant}'\?$"):
        FUNCTIONS[function](model, data, **{typo: 1})


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"batch_size": 0}, "batch_size must be at least 1, got 0"),
    ({"num_samples": -3}, "num_samples must be at least 1"),
    ({"provider": "gpu"}, "provider must be one of auto, cuda, cpu"),
    ({"shard": (2, 2)}, "shard must be I/K with 0 <= I < K"),
    ({"seed": 3}, "seed has no effect without shuffle"),
    ({"seed": -1, "shuffle": True}, "seed must be a non-negative integer"),
    ({"prior_strength": float("nan")}, "prior_strength must be a finite number >= 0"),
    ({"estimator": "median"}, "unknown estimator 'median'"),
])
def test_a_bad_value_is_an_option_error_in_api_terms(cnn_files, kwargs, needle):
    model, data = cnn_files
    with pytest.raises(ot.OptionError) as info:
        ot.recalibrate(model, data, **kwargs)
    assert needle in str(info.value)
    assert "--" not in str(info.value)


@pytest.mark.parametrize(("field", "value", "error"), [
    ("scale", 0, ot.OptionError), ("scale", float("inf"), ot.OptionError),
    ("scale", "1/255", ot.OptionTypeError), ("mean", (float("nan"), 0, 0), ot.OptionError),
    ("std", (0.2, 0.0, 0.2), ot.OptionError), ("std", "0.2", ot.OptionTypeError),
    ("crop", (224, 0), ot.OptionError), ("crop", 224.0, ot.OptionTypeError),
    ("resize", True, ot.OptionTypeError), ("layout", "nhwc", ot.OptionError),
    ("threads", 0, ot.OptionError), ("jpeg_draft", 1, ot.OptionTypeError),
])
def test_image_options_are_checked_when_made(field, value, error):
    with pytest.raises(error) as info:
        ImageOptions(**{field: value})
    assert re.search(rf"\b{field}\b", str(info.value))
    if error is ot.OptionTypeError:
        assert type(info.value) is ot.OptionTypeError


def test_right_types_of_other_kinds_are_accepted(cnn_files):
    model, data = cnn_files
    result = ot.recalibrate(model, data, batch_size=np.int64(8), num_samples=np.int32(32),
                            shuffle=np.True_, seed=np.uint8(3), prior_strength=np.float32(2))
    assert result.stats.batch_size == 8 and result.stats.num_samples == 32
    ImageOptions(crop=(32, 32), mean=np.array([0.5, 0.5, 0.5]), std=[1, 1, 1], scale=1)
