"""jaxl2.select.mask as optax's mask=, and the presets by layer type, against hand-written references.

Each test builds the expected mask, selection or updated weights by hand (NumPy float64 for
numbers) and, where a public bug report describes a failure, reproduces that failure first.
"""

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxl2
from jaxl2 import select

LR, WD = 0.1, 0.1  # one step with a zero gradient shrinks a decayed weight by LR·WD = 1%


def zeros(tree):
    return jax.tree.map(jnp.zeros_like, tree)


def one_step(tx, params):
    """params after one tx step with a zero data gradient."""
    updates, _ = tx.update(zeros(params), tx.init(params), params)
    return optax.apply_updates(params, updates)


def assert_decayed(new, old, shrink=LR * WD):
    """new == old·(1 − shrink), computed in float64 by hand, to float32 rounding."""
    np.testing.assert_allclose(
        np.asarray(new, np.float64), np.asarray(old, np.float64) * (1 - shrink), rtol=1e-6, atol=0
    )


def assert_unchanged(new, old):
    np.testing.assert_array_equal(np.asarray(new), np.asarray(old))


# ---------------------------------------------------------------------------------------------- Linen


def linen_params():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(5, bias_init=nn.initializers.constant(0.5))(x)
            x = nn.LayerNorm()(x)
            return nn.Dense(3, bias_init=nn.initializers.constant(0.5))(nn.relu(x))

    return Net().init(jax.random.key(0), jnp.ones((1, 4)))["params"]


def test_linen_mask_is_the_kernels_by_hand():
    p = linen_params()
    assert select.mask(p) == {
        "Dense_0": {"bias": False, "kernel": True},
        "Dense_1": {"bias": False, "kernel": True},
        "LayerNorm_0": {"bias": False, "scale": False},
    }
    assert all(type(m) is bool for m in jax.tree.leaves(select.mask(p)))
    assert select.mask({"params": p})["params"] == select.mask(p)
    assert select.mask(p, select=".*LayerNorm.*") == {
        "Dense_0": {"bias": False, "kernel": False},
        "Dense_1": {"bias": False, "kernel": False},
        "LayerNorm_0": {"bias": True, "scale": True},
    }


@pytest.mark.parametrize(
    "make_tx",
    [
        lambda m: optax.adamw(LR, weight_decay=WD, mask=m),
        lambda m: optax.chain(optax.add_decayed_weights(WD, mask=m), optax.sgd(LR)),
        lambda m: optax.chain(optax.masked(optax.add_decayed_weights(WD), m), optax.sgd(LR)),
    ],
    ids=["adamw", "add_decayed_weights", "masked"],
)
def test_linen_mask_in_each_optax_consumer_decays_kernels_only(make_tx):
    """With a zero gradient: kernel → kernel·(1 − lr·wd); biases and LayerNorm untouched."""
    p = linen_params()
    new = one_step(make_tx(select.mask(p)), p)
    for layer in ("Dense_0", "Dense_1"):
        assert_decayed(new[layer]["kernel"], p[layer]["kernel"])
        assert_unchanged(new[layer]["bias"], p[layer]["bias"])
    assert_unchanged(new["LayerNorm_0"]["scale"], p["LayerNorm_0"]["scale"])
    assert_unchanged(new["LayerNorm_0"]["bias"], p["LayerNorm_0"]["bias"])


def test_jitted_masked_step_compiles_once():
    p = linen_params()
    tx = optax.adamw(LR, weight_decay=WD, mask=select.mask(p))

    @jax.jit
    def step(params, state):
        updates, state = tx.update(zeros(params), state, params)
        return optax.apply_updates(params, updates), state

    p1, s1 = step(p, tx.init(p))
    p2, _ = step(p1, s1)
    assert step._cache_size() == 1
    assert_decayed(p2["Dense_0"]["kernel"], p["Dense_0"]["kernel"], shrink=1 - (1 - LR * WD) ** 2)


def test_stacked_scan_norm_scales_are_not_selected_but_ndim_rule_selects_them():
    """jaxformer#28, levanter#405: with layers stacked for scan, an `ndim > 1` mask decays the
    LayerNorm scales (now of ndim 2); selection by name keeps them out, stacked kernels (ndim 3) in."""

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return nn.LayerNorm()(nn.Dense(4)(x)), None

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            scan = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
            return scan()(x, None)[0]

    p = Stack().init(jax.random.key(0), jnp.ones((1, 4)))["params"]
    blk = p["ScanBlock_0"]
    assert blk["Dense_0"]["kernel"].shape == (3, 4, 4) and blk["LayerNorm_0"]["scale"].shape == (3, 4)
    # the public failure: the ndim rule picks the stacked norm scales and biases
    by_ndim = jax.tree.map(lambda x: x.ndim > 1, p)
    assert by_ndim["ScanBlock_0"]["LayerNorm_0"] == {"bias": True, "scale": True}
    # jaxl2: the kernels only
    assert select.mask(p) == {
        "ScanBlock_0": {
            "Dense_0": {"bias": False, "kernel": True},
            "LayerNorm_0": {"bias": False, "scale": False},
        }
    }
    new = one_step(optax.adamw(LR, weight_decay=WD, mask=select.mask(p)), p)["ScanBlock_0"]
    assert_decayed(new["Dense_0"]["kernel"], blk["Dense_0"]["kernel"])
    assert_unchanged(new["LayerNorm_0"]["scale"], blk["LayerNorm_0"]["scale"])
    assert_unchanged(new["LayerNorm_0"]["bias"], blk["LayerNorm_0"]["bias"])


# ---------------------------------------------------------------------------------------------- NNX


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(3, 4, bias_init=nnx.initializers.constant(0.5), rngs=rngs)
        self.ln = nnx.LayerNorm(4, rngs=rngs)
        self.l2 = nnx.Linear(4, 2, bias_init=nnx.initializers.constant(0.5), rngs=rngs)


def nnx_snapshot(model):
    return {k: np.asarray(v) for k, v in select.leaves(nnx.state(model, nnx.Param))}


def check_nnx_step(before, after):
    for path in ("l1/kernel", "l2/kernel"):
        assert_decayed(after[path], before[path])
    for path in ("l1/bias", "l2/bias", "ln/scale", "ln/bias"):
        assert_unchanged(after[path], before[path])


def test_nnx_state_mask_structure():
    _, state = nnx.split(NnxNet(nnx.Rngs(0)), nnx.Param)
    m = select.mask(state)
    assert isinstance(m, nnx.State)
    assert nnx.to_pure_dict(m) == {
        "l1": {"bias": False, "kernel": True},
        "l2": {"bias": False, "kernel": True},
        "ln": {"bias": False, "scale": False},
    }
    # one bool where each Variable is: a prefix of the State of Variables and of the pure State
    assert jax.tree.structure(m) == jax.tree.structure(nnx.as_pure(state))


def test_ndim_mask_fails_in_nnx_optimizer_but_jaxl2_mask_works():
    """jax-ml/jax#31256, google/flax#4901/#5372: `mask=jax.tree.map(lambda x: x.ndim > 1, state)`
    keeps the Param Variables, while nnx.Optimizer.update hands optax the pure arrays."""
    model = NnxNet(nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    naive = jax.tree.map(lambda x: x.ndim > 1, state)
    opt = nnx.Optimizer(model, optax.adamw(LR, weight_decay=WD, mask=naive), wrt=nnx.Param)
    with pytest.raises(ValueError, match="pytree structure"):
        opt.update(model, zeros(nnx.state(model, nnx.Param)))

    model = NnxNet(nnx.Rngs(0))
    before = nnx_snapshot(model)
    mask = select.mask(nnx.state(model, nnx.Param))
    opt = nnx.Optimizer(model, optax.adamw(LR, weight_decay=WD, mask=mask), wrt=nnx.Param)
    opt.update(model, zeros(nnx.state(model, nnx.Param)))
    check_nnx_step(before, nnx_snapshot(model))


def test_nnx_optimizer_under_nnx_jit_and_mask_as_a_function():
    """select.mask itself as optax's mask function: called with the State of Variables at
    init and with the pure State at update, as nnx.Optimizer does."""
    for mask in ("tree", "function"):
        model = NnxNet(nnx.Rngs(1))
        before = nnx_snapshot(model)
        m = select.mask(nnx.state(model, nnx.Param)) if mask == "tree" else select.mask
        opt = nnx.Optimizer(model, optax.adamw(LR, weight_decay=WD, mask=m), wrt=nnx.Param)

        @nnx.jit
        def step(model, opt):
            opt.update(model, zeros(nnx.state(model, nnx.Param)))

        step(model, opt)
        check_nnx_step(before, nnx_snapshot(model))


# ---------------------------------------------------------------------------------------------- Equinox


class EqxNet(eqx.Module):
    emb: eqx.nn.Embedding
    conv: eqx.nn.Conv2d
    conv1: eqx.nn.Conv1d
    convt: eqx.nn.ConvTranspose2d
    lin: eqx.nn.Linear
    ln: eqx.nn.LayerNorm
    rms: eqx.nn.RMSNorm
    gn: eqx.nn.GroupNorm
    bn: eqx.nn.BatchNorm
    stacked_lin: eqx.nn.Linear  # made with filter_vmap, as for lax.scan: weight (3, 4, 4)
    stacked_ln: eqx.nn.LayerNorm  # weight (3, 4): ndim 2, like a kernel
    act: object

    def __init__(self, key):
        k = jax.random.split(key, 6)
        self.emb = eqx.nn.Embedding(7, 4, key=k[0])
        self.conv = eqx.nn.Conv2d(2, 3, 3, key=k[1])
        self.conv1 = eqx.nn.Conv1d(2, 3, 3, key=k[2])
        self.convt = eqx.nn.ConvTranspose2d(3, 2, 3, key=k[3])
        self.lin = eqx.nn.Linear(4, 4, key=k[4])
        self.ln = eqx.nn.LayerNorm(4)
        self.rms = eqx.nn.RMSNorm(4)
        self.gn = eqx.nn.GroupNorm(2, 4)
        self.bn = eqx.nn.BatchNorm(4, axis_name="batch", mode="batch")
        self.stacked_lin = eqx.filter_vmap(lambda kk: eqx.nn.Linear(4, 4, key=kk))(jax.random.split(k[5], 3))
        self.stacked_ln = eqx.filter_vmap(lambda _: eqx.nn.LayerNorm(4))(jnp.arange(3))
        self.act = jax.nn.relu

    def __call__(self, x):  # a model is callable: so is any pytree of its type, a mask included
        return self.act(self.lin(x))


LAYERS = ("conv", "conv1", "convt", "lin", "stacked_lin")  # the Linear/Conv layers, by hand


def test_equinox_preset_selects_linear_and_conv_by_isinstance():
    """patrick-kidger/equinox#771: a name + ndim rule also takes the Embedding's weight and the
    stacked LayerNorm's (both `weight`, ndim 2); isinstance takes the Linear/Conv weights only."""
    net = EqxNet(jax.random.key(0))
    assert net.stacked_lin.weight.shape == (3, 4, 4) and net.stacked_ln.weight.shape == (3, 4)
    expected = [f"{name}/weight" for name in LAYERS]
    by_name_ndim = [p for p, w in select.leaves(net) if p.endswith("weight") and w.ndim >= 2]
    assert {"emb/weight", "stacked_ln/weight"} <= set(by_name_ndim)  # the rule jaxl2 used to have
    for params in (net, eqx.filter(net, eqx.is_array)):
        assert sorted(r.path for r in jaxl2.selected(params, select=select.equinox)) == sorted(expected)
    lam = 0.3
    np_pen = sum(lam / 2 * np.sum(np.asarray(getattr(net, n).weight, np.float64) ** 2) for n in LAYERS)
    assert float(jaxl2.l2_penalty(net, lam, select=select.equinox)) == pytest.approx(np_pen, rel=1e-6)
    grads = eqx.filter_grad(lambda m: jaxl2.l2_penalty(m, lam, select=select.equinox))(net)
    for path, g in select.leaves(grads):
        w = dict(select.leaves(net))[path]
        want = lam * np.asarray(w) if path in expected else np.zeros(w.shape)
        np.testing.assert_array_equal(np.asarray(g), want)


def test_equinox_mask_on_module_and_filtered_params_with_adamw():
    """optax#1007 / equinox#771: an Equinox module is callable, so optax's old test
    `callable(mask)` took a module-shaped mask for a mask function and called it. jaxl2's mask
    holds only bools (False where the module has a function), so optax treats it as a tree."""
    net = EqxNet(jax.random.key(1))
    params = eqx.filter(net, eqx.is_array)
    m_full = select.mask(net, select=select.equinox)
    m_params = select.mask(params, select=select.equinox)
    assert callable(m_full)  # what fooled `callable(mask)`:
    with pytest.raises(TypeError):
        m_full(params)  # calling the mask as a mask function, as optax < #1007 did
    assert all(type(b) is bool for b in jax.tree.leaves(m_full))
    assert m_full.act is False and m_full.stacked_lin.weight is True and m_full.emb.weight is False
    for m in (m_full, m_params):
        chosen = [select.path_str(kp) for kp, b in jax.tree_util.tree_flatten_with_path(m)[0] if b]
        assert chosen == [f"{n}/weight" for n in LAYERS]
    for m in (m_full, m_params):  # the full module's mask is a prefix of the filtered params too
        new = one_step(optax.adamw(LR, weight_decay=WD, mask=m), params)
        for path, w in select.leaves(params):
            got = dict(select.leaves(new))[path]
            (assert_decayed if path in {f"{n}/weight" for n in LAYERS} else assert_unchanged)(got, w)


def test_equinox_full_module_mask_with_add_decayed_weights():
    """The full module (functions included) as optax's params, gradients from eqx.filter_grad."""
    mlp = eqx.nn.MLP(3, 2, 4, 2, key=jax.random.key(0))
    grads = eqx.filter_grad(lambda m: 0.0 * jnp.sum(m(jnp.ones(3))))(mlp)
    tx = optax.add_decayed_weights(WD, mask=select.mask(mlp, select=select.equinox))
    updates, _ = tx.update(grads, tx.init(eqx.filter(mlp, eqx.is_array)), mlp)
    for layer, u in zip(mlp.layers, updates.layers):
        np.testing.assert_allclose(u.weight, WD * np.asarray(layer.weight), rtol=1e-6)
        np.testing.assert_array_equal(u.bias, 0.0)


# ---------------------------------------------------------------------------------------------- Haiku


def haiku_params():
    hk = pytest.importorskip("haiku")

    def f(x, ids):
        e = hk.Embed(10, 4)(ids)
        h = hk.LayerNorm(-1, create_scale=True, create_offset=True)(hk.Linear(4)(x) + e)
        c = hk.Conv2D(3, 3)(jnp.ones((1, 4, 4, 2)))
        return hk.nets.MLP([4, 2])(h), c

    params = hk.transform(f).init(jax.random.key(0), jnp.ones((1, 3)), jnp.zeros((1,), int))
    return jax.tree.map(lambda x: x + 0.5, params)  # non-zero biases and offsets


def test_haiku_preset_and_mask():
    params = haiku_params()
    assert select.mask(params, select=select.haiku) == {
        "conv2_d": {"b": False, "w": True},
        "embed": {"embeddings": False},
        "layer_norm": {"offset": False, "scale": False},
        "linear": {"b": False, "w": True},
        "mlp/~/linear_0": {"b": False, "w": True},
        "mlp/~/linear_1": {"b": False, "w": True},
    }
    new = one_step(optax.adamw(LR, weight_decay=WD, mask=select.mask(params, select=select.haiku)), params)
    for module, leaves in params.items():
        for name, w in leaves.items():
            (assert_decayed if name == "w" else assert_unchanged)(new[module][name], w)


# ---------------------------------------------------------------------------------------------- errors


def test_empty_selection_is_an_error_listing_the_paths():
    """transformers#11936: rules written for other names silently decayed the wrong leaves; a
    jaxl2 selection that matches nothing says so and shows what exists."""
    hk_like = {
        "mlp/~/linear_0": {"w": jnp.ones((2, 2)), "b": jnp.ones(2)},
        "embed": {"embeddings": jnp.ones((3, 2))},
    }
    with pytest.raises(
        jaxl2.Jaxl2Error, match=r"default selection .* matched no parameter.*embed/embeddings"
    ):
        select.mask(hk_like)
    with pytest.raises(jaxl2.Jaxl2Error, match=r"select='.\*LayerNorm.\*' matched no parameter.*linear_0/w"):
        select.mask(hk_like, select=".*LayerNorm.*")
    with pytest.raises(
        jaxl2.Jaxl2Error, match=r"select=jaxl2.select.equinox \(.*eqx.nn.Linear.*\) matched no"
    ):
        select.mask(hk_like, select=select.equinox)
    with pytest.raises(jaxl2.Jaxl2Error, match=r"select must be None .* or a jaxl2.select.Preset; got int"):
        select.mask(hk_like, select=3)


def test_a_preset_needs_the_whole_params():
    with pytest.raises(jaxl2.Jaxl2Error, match=r"needs the whole params.*'lin/weight'"):
        select.predicate(select.equinox)("lin/weight", jnp.ones((2, 2)))
    first = select.Preset("first", lambda params: ["b"], "the leaf b")
    assert select.mask({"a": jnp.ones(2), "b": jnp.ones(2), "c": jnp.arange(2)}, select=first) == {
        "a": False,
        "b": True,
        "c": False,
    }
