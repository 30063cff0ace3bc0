"""The control manifold: formulas at known points, shapes of the schedules, validation."""

from __future__ import annotations

import dataclasses
import inspect
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from creative_sparse import control
from creative_sparse.config import QualityWeights, SparsityConfig
from creative_sparse.control import (
    SparsityController,
    SparsityParams,
    attention_keys,
    check_level,
    experts_per_token,
    keep_fraction,
    kernel_thresholds,
    cache_budget,
    router_temperature,
    seed_k_attn,
    temperature,
    token_pruning_rate,
    top_p,
)

GRID = np.linspace(0.0, 1.0, 1001)
levels = st.floats(0.0, 1.0, allow_nan=False)


def params(s, cfg=None, **kw) -> SparsityParams:
    return SparsityController(cfg).get_sparsity_params(s, **kw)


# --- formulas at known points -------------------------------------------------------------

def test_s0_is_the_dense_model():
    p = params(0.0, num_experts=8, default_experts=2, context_len=777)
    assert p.temperature == 0.8 and p.top_p == 0.9
    assert p.experts_per_token == 2 and p.router_temperature == 1.0
    assert p.keep_fraction == 1.0 and p.attention_keys == 777
    assert p.token_pruning_rate == 0.0
    assert (p.simthreshd1, p.cdfthreshd, p.pvthreshd) == (0.6, 0.97, 15)


def test_s0_uses_config_constants():
    cfg = SparsityConfig(T0=0.7, p0=0.8, K0=3, simthreshd1=0.5, pvthreshd=3)
    p = params(0.0, cfg, num_experts=8, default_experts=2)
    assert (p.temperature, p.top_p, p.experts_per_token) == (0.7, 0.8, 3)
    assert (p.simthreshd1, p.pvthreshd) == (0.5, 3)  # pv floor never lifts the base value


@pytest.mark.parametrize("s", [0.1, 0.37, 0.5, 0.9, 1.0], ids=lambda s: f"s={s}")
def test_formulas_match_the_written_math(s):
    cfg = SparsityConfig(T0=1.3, kappa_T=0.9, p0=0.5, kappa_p=0.2, sigma_p=0.4, kappa_K=0.25,
                         tau_K=0.2, kappa_router=0.3, k0_frac=0.1, k0=2.0, kappa_a=0.3)
    p = params(s, cfg, num_experts=16, default_experts=2, head_dim=60)
    assert p.temperature == pytest.approx(1.3 * math.exp(0.9 * s * (1 - s / 2)), rel=1e-12)
    assert p.top_p == pytest.approx(min(1.0, 0.5 + 0.2 * s * math.tanh(s / 0.4)), rel=1e-12)
    k = 2 + 0.25 * s * 16 * (1 - math.exp(-s / 0.2))
    assert p.experts_per_token == min(16, math.floor(k + 0.5))
    assert p.router_temperature == pytest.approx(math.exp(0.3 * s), rel=1e-12)
    assert p.keep_fraction == pytest.approx(0.1 + 0.9 * math.sqrt(1 - s * s), rel=1e-12)
    assert p.k_attn_seed == pytest.approx(2.0 + 0.3 * s * 60 * math.sqrt(1 - s * s), rel=1e-12)
    assert p.simthreshd1 == pytest.approx(0.6 * (1 - 0.3 * s), rel=1e-12)
    assert p.cdfthreshd == pytest.approx(0.97 * (1 - 0.2 * s), rel=1e-12)
    assert p.pvthreshd == max(5, int(15 * (1 - 0.4 * s)))
    assert p.token_pruning_rate == pytest.approx(min(0.5, 0.4 * s ** 1.5), rel=1e-12)


def test_seed_values_at_seed_operating_point():
    # The seed's SparsityController with its constants (K with E = 8, rounded, not floored).
    ctl = SparsityController(SparsityConfig.seed_constants())
    assert ctl.get_temperature(0.6) == pytest.approx(math.exp(0.5 * 0.6 * 0.7))
    assert ctl.get_nucleus_threshold(0.3) == pytest.approx(0.9 + 0.3 * 0.3 * math.tanh(0.6))
    assert ctl.get_nucleus_threshold(0.6) == 1.0  # the seed returns 1.05 here; we clamp
    assert ctl.get_expert_activation(0.6) == 3  # 1 + 0.4*0.6*8*(1 - e^-2) = 2.66
    assert ctl.get_attention_scaling(0.6) == pytest.approx(1 + 0.2 * 0.6 * 64 * 0.8)
    p = ctl.get_sparsity_params(0.6)
    assert p["nucleus_threshold"] == p.top_p and p["attention_scaling"] == p.k_attn_seed
    assert p["simthreshd1"] == p.simthreshd1
    with pytest.raises(KeyError):
        p["no_such_knob"]


def test_function_defaults_equal_config_defaults():
    cfg = SparsityConfig()
    renamed = {"schedule": None, "rate": "token_pruning_rate", "power": None, "cap":
               "max_token_pruning_rate"}
    functions = [temperature, top_p, experts_per_token, router_temperature, keep_fraction,
                 seed_k_attn, attention_keys, kernel_thresholds]
    for fn in functions:
        for name, prm in inspect.signature(fn).parameters.items():
            if prm.kind is prm.KEYWORD_ONLY and renamed.get(name, name) is not None:
                if name == "K0":
                    assert prm.default == 1  # the seed's K0; config None = "model default or 1"
                    continue
                assert prm.default == getattr(cfg, renamed.get(name, name)), (fn.__name__, name)
    power = {fn: inspect.signature(fn).parameters["power"].default
             for fn in (token_pruning_rate,)}
    assert power == {token_pruning_rate: cfg.token_pruning_power}
    assert inspect.signature(temperature).parameters["schedule"].default == cfg.temperature_schedule
    assert inspect.signature(top_p).parameters["schedule"].default == cfg.nucleus_adaptation


def test_constant_schedules():
    cfg = SparsityConfig(temperature_schedule="constant", nucleus_adaptation="constant", T0=0.8)
    for s in (0.0, 0.5, 1.0):
        assert params(s, cfg).temperature == 0.8 and params(s, cfg).top_p == 0.9


# --- shapes: monotone, clamped, the seed schedule's hump -----------------------------------

def test_monotone_schedule_is_non_increasing_from_dense_to_k0_frac():
    values = [keep_fraction(s) for s in GRID]
    assert values[0] == 1.0 and values[-1] == pytest.approx(0.05)
    assert all(a >= b for a, b in zip(values, values[1:]))
    keys = [attention_keys(s, 1023) for s in GRID]
    assert keys[0] == 1023 and keys[-1] == math.ceil(0.05 * 1023)
    assert all(a >= b for a, b in zip(keys, keys[1:]))


@pytest.mark.parametrize("knob", [temperature, top_p, router_temperature, token_pruning_rate],
                         ids=lambda f: f.__name__)
def test_rising_knobs_are_non_decreasing(knob):
    values = [knob(s) for s in GRID]
    assert all(a <= b for a, b in zip(values, values[1:]))


def test_thresholds_fall_with_s():
    triples = [kernel_thresholds(s) for s in GRID]
    for i in range(3):
        column = [t[i] for t in triples]
        assert all(a >= b for a, b in zip(column, column[1:]))


def test_seed_k_attn_is_zero_extra_at_both_ends_and_peaks_near_0_71():
    assert seed_k_attn(0.0) == 1.0 and seed_k_attn(1.0) == 1.0
    values = np.array([seed_k_attn(s) for s in GRID])
    assert GRID[values.argmax()] == pytest.approx(2 ** -0.5, abs=1e-3)
    assert values.max() == pytest.approx(1.0 + 0.2 * 64 / 2)
    cfg = SparsityConfig(attention_schedule="seed")
    assert params(0.0, cfg, context_len=4096).attention_keys == 1
    assert params(1.0, cfg, context_len=4096).attention_keys == 1
    peak = params(2 ** -0.5, cfg, context_len=4096)
    assert peak.attention_keys == 7 and peak.keep_fraction == 7 / 4096
    assert params(0.5, cfg).keep_fraction is None  # no context length, no fraction


@settings(max_examples=200, deadline=None)
@given(s=levels, p0=st.floats(1e-6, 1.0), kappa_p=st.floats(0.0, 50.0),
       sigma_p=st.floats(1e-3, 10.0))
def test_top_p_never_leaves_0_1(s, p0, kappa_p, sigma_p):
    p = params(s, SparsityConfig(p0=p0, kappa_p=kappa_p, sigma_p=sigma_p)).top_p
    assert 0.0 < p <= 1.0


@settings(max_examples=200, deadline=None)
@given(s=levels, e=st.integers(1, 256), k0=st.one_of(st.none(), st.integers(1, 300)),
       kappa_K=st.floats(0.0, 20.0), tau_K=st.floats(1e-3, 10.0))
def test_experts_stay_in_1_to_E(s, e, k0, kappa_K, tau_K):
    cfg = SparsityConfig(K0=k0, kappa_K=kappa_K, tau_K=tau_K)
    k = params(s, cfg, num_experts=e).experts_per_token
    assert isinstance(k, int) and 1 <= k <= e


@settings(max_examples=200, deadline=None)
@given(s=levels, n=st.integers(1, 10**6), frac=st.floats(1e-6, 1.0),
       schedule=st.sampled_from(["monotone", "seed"]))
def test_attention_keys_stay_in_1_to_context_len(s, n, frac, schedule):
    k = attention_keys(s, n, schedule=schedule, k0_frac=frac)
    assert 1 <= k <= n


def test_pruning_rate_is_capped():
    cfg = SparsityConfig(token_pruning_rate=1.0, max_token_pruning_rate=0.5)
    assert max(params(s, cfg).token_pruning_rate for s in GRID) == 0.5


def test_not_moe_leaves_moe_knobs_none():
    p = params(0.5)
    assert p.experts_per_token is None and p.router_temperature is None
    assert p.attention_keys is None and p.keep_fraction is not None


# --- validation ---------------------------------------------------------------------------

@pytest.mark.parametrize("s", [-0.1, 1.1, float("nan"), float("inf"), "0.5", None, True],
                         ids=repr)
def test_bad_levels_raise(s):
    with pytest.raises(ValueError, match=r"s = .*\[0, 1\]"):
        params(s)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        keep_fraction(s)


def test_numpy_levels_are_accepted():
    assert check_level(np.float32(0.5)) == 0.5 and check_level(np.int64(1)) == 1.0


@pytest.mark.parametrize("field, value, pattern", [
    ("token_pruning_rate", -0.1, r"token_pruning_rate = -0.1 .*\[0, 1\]"),
    ("kv_reuse_ratio", 1.5, r"kv_reuse_ratio = 1.5 .*\[0, 1\]"),
    ("p0", 0.0, r"p0 = 0.0 .*\(0, 1\]"),
    ("p0", 1.01, r"p0 = 1.01 .*\(0, 1\]"),
    ("T0", 0.0, r"T0 = 0.0 .*\(0, inf\)"),
    ("T0", -1.0, r"T0 = -1.0 .*\(0, inf\)"),
    ("T0", float("nan"), r"T0 = nan is not finite"),
    ("kappa_T", 11.0, r"kappa_T = 11.0 .*\[0, 10\]"),
    ("sigma_p", 0.0, r"sigma_p = 0.0"),
    ("tau_K", -0.3, r"tau_K = -0.3"),
    ("K0", 0, r"K0 = 0 .*\[1, inf\)"),
    ("K0", 1.5, r"K0 = 1.5 is not an integer"),
    ("pvthreshd", 15.0, r"pvthreshd = 15.0 is not an integer"),
    ("cdfthreshd", 0.0, r"cdfthreshd = 0.0 .*\(0, 1\]"),
    ("simthreshd1", 1.2, r"simthreshd1 = 1.2 .*\[-1, 1\]"),
    ("k0_frac", 0.0, r"k0_frac = 0.0 .*\(0, 1\]"),
    ("max_token_pruning_rate", 1.0, r"max_token_pruning_rate = 1.0 .*\[0, 1\)"),
    ("cdf_slope", 1.0, r"cdf_slope = 1.0"),
    ("head_dim", 0, r"head_dim = 0"),
    ("attention_schedule", "hump", r"attention_schedule = 'hump' is not one of"),
    ("temperature_schedule", "linear", r"temperature_schedule = 'linear'"),
    ("attention_sparsity", "0.6", r"attention_sparsity = '0.6' is not a real number"),
], ids=lambda v: str(v))
def test_bad_config_fields_raise(field, value, pattern):
    with pytest.raises(ValueError, match=rf"SparsityConfig\.{pattern}"):
        SparsityConfig(**{field: value})


@pytest.mark.parametrize("kwargs, pattern", [
    ({"num_experts": 0}, r"num_experts = 0"),
    ({"num_experts": 8, "default_experts": 9}, r"default_experts = 9 .*\[1, 8\]"),
    ({"default_experts": 2}, r"default_experts = 2 needs num_experts"),
    ({"context_len": 0}, r"context_len = 0"),
    ({"head_dim": -64}, r"head_dim = -64"),
], ids=["E=0", "default>E", "default-without-E", "L=0", "d<0"])
def test_bad_model_arguments_raise(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        params(0.5, **kwargs)


@pytest.mark.parametrize("kwargs, pattern", [
    ({"alpha": -0.1}, r"QualityWeights\.alpha = -0.1 .*\[0, inf\)"),
    ({"gamma": float("inf")}, r"QualityWeights\.gamma = inf is not finite"),
    ({"alpha": 0, "beta": 0, "gamma": 0}, r"all 0"),
], ids=["negative", "inf", "all-zero"])
def test_bad_quality_weights_raise(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        QualityWeights(**kwargs)


def test_controller_rejects_non_config():
    with pytest.raises(ValueError, match="not a SparsityConfig"):
        SparsityController({"T0": 1.0})


# --- frozen, seed-style construction, output forms ------------------------------------------

@pytest.mark.parametrize("obj, field", [
    (SparsityConfig(), "T0"), (QualityWeights(), "alpha"), (params(0.3), "temperature"),
], ids=["config", "weights", "params"])
def test_frozen(obj, field):
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(obj, field, 2.0)


def test_seed_style_construction():
    cfg = SparsityConfig()
    assert (cfg.attention_sparsity, cfg.token_pruning_rate, cfg.moe_expert_entropy,
            cfg.kv_reuse_ratio, cfg.temperature_schedule, cfg.nucleus_adaptation,
            cfg.simthreshd1, cfg.cdfthreshd, cfg.pvthreshd) == (
        0.6, 0.4, 0.8, 0.3, "exponential", "sigmoidal", 0.6, 0.97, 15)
    with pytest.warns(UserWarning, match="kv_reuse_ratio has no effect"):
        positional = SparsityConfig(0.7, 0.3, 0.8, 0.2, "exponential", "sigmoidal", 0.5, 0.9, 12)
    with pytest.warns(UserWarning, match="kv_reuse_ratio has no effect"):
        assert positional == SparsityConfig(attention_sparsity=0.7, token_pruning_rate=0.3,
                                            kv_reuse_ratio=0.2, simthreshd1=0.5,
                                            cdfthreshd=0.9, pvthreshd=12)
    with pytest.raises(TypeError):  # formula constants are keyword-only
        SparsityConfig(0.7, 0.3, 0.8, 0.2, "exponential", "sigmoidal", 0.5, 0.9, 12, 1.0)
    w = QualityWeights()
    assert (w.alpha, w.beta, w.gamma) == (0.4, 0.3, 0.3)
    assert QualityWeights(0.5, 0.25, 0.25) == QualityWeights(alpha=0.5, beta=0.25, gamma=0.25)
    assert (w.novelty, w.diversity, w.incoherence) == (0.4, 0.3, 0.3)
    assert SparsityController(cfg).config is cfg and SparsityController().config == cfg


def test_as_dict_and_repr():
    p = params(0.7, num_experts=8, context_len=1000)
    d = p.as_dict()
    assert set(d) == {f.name for f in dataclasses.fields(SparsityParams)}
    assert d["temperature"] == p.temperature and d["attention_keys"] == p.attention_keys
    text = repr(params(0.7))
    assert text.startswith("SparsityParams(s=0.7, temperature=0.9") and "experts" not in text
    assert len(text) < 300


def test_import_does_no_work():
    assert not any(isinstance(v, (SparsityController, SparsityParams))
                   for v in vars(control).values())


def test_seed_dict_keys_work_for_a_dense_model():
    # The seed's example formats params['expert_activation'] with ':7d' for any model.
    p = SparsityController().get_sparsity_params(0.6)
    assert p.experts_per_token is None
    assert p["expert_activation"] == SparsityController().get_expert_activation(0.6) == 3
    assert f"{p['expert_activation']:7d}" == "      3"


def test_cache_budget():
    assert cache_budget(0.0, 10_000) is None                 # no pruning asked
    assert cache_budget(0.4, 511) is None                    # too short to prune
    assert cache_budget(0.25, 1000) == 750
    assert cache_budget(0.99, 600, protected=36) == 37       # never below sinks + window + 1
    assert cache_budget(0.3, 300, prune_from=100) == 210
    with pytest.raises(ValueError, match=r"pruning_rate must be in \[0, 1\]"):
        cache_budget(1.5, 1000)
    with pytest.raises(ValueError, match="context_tokens"):
        cache_budget(0.3, 0)


@pytest.mark.parametrize("field, value", [("kv_reuse_ratio", 0.5), ("kv_reuse_power", 2.0),
                                          ("moe_expert_entropy", 0.1)])
def test_fields_without_effect_warn_when_set(field, value, recwarn):
    with pytest.warns(UserWarning, match=f"{field} has no effect"):
        SparsityConfig(**{field: value})
    SparsityConfig()                                         # defaults: silent
    assert not [w for w in recwarn if "has no effect" in str(w.message)]
