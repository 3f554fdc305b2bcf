"""K-FAC found in the jaxpr against independent references, in float64: factors built by hand
from a hand-written forward pass (each layer's output perturbed, ``jax.jacobian``, the
likelihood's Hessian written out) for Linen, NNX, Equinox and Haiku models, layers stacked for
``scan`` and a sequence (K-FAC-expand); the exact GGN block where K-FAC is exact."""

import equinox as eqx
import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxl2

F64 = jnp.float64


@pytest.fixture(autouse=True)
def float64():
    with jax.enable_x64(True):
        yield


def hand_kfac(forward, shapes, likelihood="classification", sigma=1.0):
    """Per layer ``(A, G)`` of K-FAC(-expand) from ``forward(shifts) -> (outputs (n, C), inputs)``,
    ``shifts[l]`` (of ``shapes[l]``: ``(n, ..., O)``) added to layer ``l``'s output: with ``B_ir``
    the Jacobian of example ``i``'s outputs in row ``r`` of ``z`` and ``Λ_i`` the likelihood's
    Hessian, ``A = Σ_ir a_ir a_irᵀ / (n·R)``, ``G = Σ_ir B_irᵀ Λ_i B_ir``."""
    zeros = [jnp.zeros(s, F64) for s in shapes]
    out, inputs = forward(zeros)
    n, c = out.shape
    if likelihood == "classification":
        p = jax.nn.softmax(out)
        lam = jax.vmap(jnp.diag)(p) - p[:, :, None] * p[:, None, :]
    else:
        lam = jnp.broadcast_to(jnp.eye(c) / sigma**2, (n, c, c))
    jacs = jax.jacobian(lambda s: forward(s)[0])(zeros)
    pairs = []
    for a, jac, shape in zip(inputs, jacs, shapes):
        rows = int(np.prod(shape[1:-1]))
        jac = jac.reshape(n, c, n, rows, shape[-1])
        b = jnp.stack([jac[i, :, i] for i in range(n)])  # (n, C, R, O)
        g = jnp.einsum("icro,icd,idrp->op", b, lam, b)
        a = a.reshape(n * rows, -1)
        pairs.append((a.T @ a / (n * rows), g))
    return pairs


def tanh_mlp(layers, x, shifts):
    """``tanh`` between dense layers ``[(W (in, out), b)]``; a shift on each output."""
    h, inputs = x, []
    for i, (w, b) in enumerate(layers):
        inputs.append(h)
        z = h @ w + b + shifts[i]
        h = jnp.tanh(z) if i < len(layers) - 1 else z
    return h, inputs


def data(n=7, d=3, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=(n, d))), jnp.asarray(rng.integers(0, classes, size=n))


class TanhMLP(nn.Module):
    outputs: int

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(4, param_dtype=F64)(x))
        return nn.Dense(self.outputs, param_dtype=F64)(h)


def linen_model():
    net = TanhMLP(3)
    params = net.init(jax.random.PRNGKey(0), jnp.ones((1, 3)))
    layers = [(params["params"][k]["kernel"], params["params"][k]["bias"]) for k in ("Dense_0", "Dense_1")]
    paths = {f"params/Dense_{i}/{k}": (i, k) for i in range(2) for k in ("kernel", "bias")}
    return net.apply, params, layers, paths


def nnx_model():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l0 = nnx.Linear(3, 4, param_dtype=F64, rngs=rngs)
            self.l1 = nnx.Linear(4, 3, param_dtype=F64, rngs=rngs)

        def __call__(self, x):
            return self.l1(jnp.tanh(self.l0(x)))

    graph, state = nnx.split(Net(nnx.Rngs(0)))
    layers = [(state[k]["kernel"][...], state[k]["bias"][...]) for k in ("l0", "l1")]
    paths = {f"l{i}/{k}": (i, k) for i in range(2) for k in ("kernel", "bias")}
    return (lambda s, x: nnx.merge(graph, s)(x)), state, layers, paths


def equinox_model():
    mlp = eqx.nn.MLP(3, 3, 4, 1, activation=jnp.tanh, key=jax.random.PRNGKey(0), dtype=F64)
    params, static = eqx.partition(mlp, eqx.is_array)
    layers = [(layer.weight.T, layer.bias) for layer in mlp.layers]  # weight (out, in)
    paths = {
        f"layers/{i}/{k}": (i, "kernel" if k == "weight" else k) for i in range(2) for k in ("weight", "bias")
    }
    return (lambda p, x: jax.vmap(eqx.combine(p, static))(x)), params, layers, paths


def haiku_model():
    def forward(x):
        h = jnp.tanh(hk.Linear(4)(x))
        return hk.Linear(3)(h)

    net = hk.without_apply_rng(hk.transform(forward))
    params = jax.tree.map(lambda w: w.astype(F64), net.init(jax.random.PRNGKey(0), jnp.ones((1, 3))))
    layers = [(params[k]["w"], params[k]["b"]) for k in ("linear", "linear_1")]
    paths = {
        f"{k}/{w}": (i, "kernel" if w == "w" else "bias")
        for i, k in enumerate(("linear", "linear_1"))
        for w in "wb"
    }
    return net.apply, params, layers, paths


@pytest.mark.parametrize("model", [linen_model, nnx_model, equinox_model, haiku_model])
def test_factors_equal_kfac_built_by_hand(model):
    """Every kernel's and bias's factors, on a padded last chunk (7 examples, 3 at a time)."""
    apply_fn, params, layers, paths = model()
    x, y = data()
    curv = jaxl2.ggn(apply_fn, params, x, y, structure="kron", select=".*", batch_size=3)
    shapes = [(7, 4), (7, 3)]
    hand = hand_kfac(lambda s: tanh_mlp(layers, x, s), shapes)
    assert sorted(curv.paths) == sorted(paths)
    for path, (a, g) in zip(curv.paths, curv.ggn):
        layer, kind = paths[path]
        want_a = hand[layer][0] if kind == "kernel" else np.ones((1, 1))
        np.testing.assert_allclose(a, want_a, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(g, hand[layer][1], rtol=1e-10, atol=1e-13)


def test_layers_stacked_by_nn_scan_get_factors_per_slice():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, h, _):
            return jnp.tanh(nn.Dense(3, param_dtype=F64)(h)), None

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            blocks = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
            h, _ = blocks()(x, None)
            return nn.Dense(4, param_dtype=F64)(h)

    net = Net()
    x, y = data(n=6, classes=4)
    params = net.init(jax.random.PRNGKey(1), x)
    stack, head = params["params"]["ScanBlock_0"]["Dense_0"], params["params"]["Dense_0"]

    def forward(s):
        h, inputs = x, []
        for i in range(2):
            inputs.append(h)
            h = jnp.tanh(h @ stack["kernel"][i] + stack["bias"][i] + s[i])
        inputs.append(h)
        return h @ head["kernel"] + head["bias"] + s[2], inputs

    hand = hand_kfac(forward, [(6, 3), (6, 3), (6, 4)])
    curv = jaxl2.ggn(net.apply, params, x, y, structure="kron", select=".*kernel")
    by_path = dict(zip(curv.paths, curv.ggn))
    a, g = by_path["params/ScanBlock_0/Dense_0/kernel"]
    assert a.shape == (2, 3, 3) and g.shape == (2, 3, 3)
    for i in range(2):
        np.testing.assert_allclose(a[i], hand[i][0], rtol=1e-10)
        np.testing.assert_allclose(g[i], hand[i][1], rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(by_path["params/Dense_0/kernel"][1], hand[2][1], rtol=1e-10, atol=1e-13)


def sequence_model():
    """A tanh MLP on each position of a sequence ``(B, T, D)``, Gaussian outputs ``(B, T, 2)``."""
    net = TanhMLP(2)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(5, 3, 3)))
    y = jnp.asarray(np.random.default_rng(3).normal(size=(5, 3, 2)))
    return net, net.init(jax.random.PRNGKey(2), x), x, y


def test_a_sequence_gets_kfac_expand():
    net, params, x, y = sequence_model()
    p = params["params"]
    layers = [(p[k]["kernel"], p[k]["bias"]) for k in ("Dense_0", "Dense_1")]

    def forward(s):
        out, inputs = tanh_mlp(layers, x, s)
        return out.reshape(5, -1), inputs

    hand = hand_kfac(forward, [(5, 3, 4), (5, 3, 2)], "gaussian", sigma=0.5)
    curv = jaxl2.ggn(
        net.apply, params, x, y, likelihood="gaussian", sigma=0.5, structure="kron", batch_size=2
    )
    for (a, g), (want_a, want_g) in zip(curv.ggn, hand):
        np.testing.assert_allclose(a, want_a, rtol=1e-10)
        np.testing.assert_allclose(g, want_g, rtol=1e-10, atol=1e-13)


def test_kfac_expand_is_exact_for_a_linear_model_on_a_sequence():
    net = nn.Dense(2, param_dtype=F64)
    x = jnp.asarray(np.random.default_rng(4).normal(size=(6, 3, 4)))
    y = jnp.zeros((6, 3, 2))
    params = net.init(jax.random.PRNGKey(0), x)
    args = dict(likelihood="gaussian", sigma=0.7, select=".*kernel", batch_size=4)
    ((a, g),) = jaxl2.ggn(net.apply, params, x, y, structure="kron", **args).ggn
    full = jaxl2.ggn(net.apply, params, x, y, structure="full", **args).ggn
    np.testing.assert_allclose(np.kron(a, g), full, rtol=1e-10, atol=1e-12)


def test_kfac_is_the_exact_block_for_one_example():
    apply_fn, params, _, _ = linen_model()
    x, y = data(n=1)
    for path in ("params/Dense_0/kernel", "params/Dense_1/kernel", "params/Dense_0/bias"):
        ((a, g),) = jaxl2.ggn(apply_fn, params, x, y, structure="kron", select=path).ggn
        full = jaxl2.ggn(apply_fn, params, x, y, structure="full", select=path).ggn
        np.testing.assert_allclose(np.kron(a, g), full, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("model", [linen_model, equinox_model])
def test_diag_and_ekfac_equal_the_exact_block_in_their_basis(model):
    """The fast diagonal is the per-example GGN's diagonal; EK-FAC's values, in the leaf's shape,
    are the exact block's diagonal in the eigenbasis of the factors (built by hand)."""
    apply_fn, params, layers, paths = model()
    x, y = data()
    hand = hand_kfac(lambda s: tanh_mlp(layers, x, s), [(7, 4), (7, 3)])
    full = jaxl2.ggn(apply_fn, params, x, y, structure="full", select=".*")
    diag = jaxl2.ggn(apply_fn, params, x, y, structure="diag", select=".*", batch_size=3)
    ekfac = jaxl2.ggn(apply_fn, params, x, y, structure="ekfac", select=".*", batch_size=3)
    ends = np.cumsum([0] + [d.size for d in diag.ggn])
    for path, d, e, lo, hi in zip(full.paths, diag.ggn, ekfac.ggn, ends[:-1], ends[1:]):
        block = full.ggn[lo:hi, lo:hi]
        np.testing.assert_allclose(d.ravel(), np.diag(block), rtol=1e-10, atol=1e-13)
        layer, kind = paths[path]
        u = np.linalg.eigh(hand[layer][0])[1] if kind == "kernel" else np.ones((1, 1))
        v = np.linalg.eigh(hand[layer][1])[1]
        q = np.kron(v, u) if path.endswith("weight") else np.kron(u, v)  # Equinox: (out, in)
        assert e.shape == d.shape
        np.testing.assert_allclose(e.ravel(), np.diag(q.T @ block @ q), rtol=1e-8, atol=1e-12)


def test_under_jit():
    apply_fn, params, _, _ = linen_model()
    x, y = data()
    eager = jaxl2.ggn(apply_fn, params, x, y, structure="kron", batch_size=3)
    jitted = jax.jit(lambda p, x, y: jaxl2.ggn(apply_fn, p, x, y, structure="kron", batch_size=3))(
        params, x, y
    )
    for u, v in zip(jax.tree.leaves(eager.ggn), jax.tree.leaves(jitted.ggn)):
        np.testing.assert_allclose(u, v, rtol=1e-12)
    assert float(jaxl2.log_evidence(jitted, params, 0.1)) == pytest.approx(
        float(jaxl2.log_evidence(eager, params, 0.1))
    )


def conv_model():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Conv(2, (2,), param_dtype=F64)(x[..., None])
            return nn.Dense(3, param_dtype=F64)(h.reshape(h.shape[0], -1))

    return Net()


def norm_model():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, param_dtype=F64)(nn.LayerNorm(param_dtype=F64)(x))

    return Net()


@pytest.mark.parametrize(
    "net, select, match",
    [
        (
            conv_model(),
            ".*Conv_0/kernel",
            r"'params/Conv_0/kernel' enters apply_fn through conv_general_dilated",
        ),
        (norm_model(), ".*scale", r"'params/LayerNorm_0/scale' enters apply_fn through mul"),
    ],
)
def test_a_leaf_outside_a_dense_product_is_named(net, select, match):
    x, y = data()
    params = net.init(jax.random.PRNGKey(0), x)
    with pytest.raises(
        jaxl2.Jaxl2Error, match=match + r".*structure 'diag' or 'full' of jaxl2.ggn, or leave"
    ):
        jaxl2.ggn(net.apply, params, x, y, structure="kron", select=select)
    # the exact diagonal falls back to per-example Jacobians
    (diag,) = jaxl2.ggn(net.apply, params, x, y, structure="diag", select=select).ggn
    full = jaxl2.ggn(net.apply, params, x, y, structure="full", select=select).ggn
    np.testing.assert_allclose(diag.ravel(), np.diag(full), rtol=1e-10, atol=1e-13)


def test_a_kernel_in_two_dense_products_is_named():
    params = {"w": jnp.eye(3, dtype=F64)}
    x, y = data()
    with pytest.raises(jaxl2.Jaxl2Error, match="'w' enters apply_fn in more than one dense product"):
        jaxl2.ggn(lambda p, x: jnp.tanh(x @ p["w"]) @ p["w"], params, x, y, structure="kron", select="w")


def test_layers_inside_jit_remat_and_custom_jvp_calls():
    """The interpreter enters the calls that take a selected leaf: the factors are those of the
    same layers written plainly."""
    apply_fn, params, layers, _ = linen_model()
    x, y = data()

    @jax.custom_jvp
    def dense(w, b, h):
        return h @ w + b

    dense.defjvp(lambda primals, tangents: jax.jvp(lambda w, b, h: h @ w + b, primals, tangents))
    first = jax.checkpoint(jax.jit(lambda w, b, h: jnp.tanh(h @ w + b)))

    def wrapped(p, x):
        q = p["params"]
        return dense(
            q["Dense_1"]["kernel"],
            q["Dense_1"]["bias"],
            first(q["Dense_0"]["kernel"], q["Dense_0"]["bias"], x),
        )

    plain = jaxl2.ggn(apply_fn, params, x, y, structure="kron", select=".*", batch_size=3)
    calls = jaxl2.ggn(wrapped, params, x, y, structure="kron", select=".*", batch_size=3)
    assert calls.paths == plain.paths
    for u, v in zip(jax.tree.leaves(calls.ggn), jax.tree.leaves(plain.ggn)):
        np.testing.assert_allclose(u, v, rtol=1e-12, atol=1e-15)


def test_an_equinox_stack_scanned_gets_factors_per_slice():
    """Equinox layers stacked by ``filter_vmap`` and run by ``lax.scan``: inside the scan each
    layer is ``dot_general(W (out, in), x)`` then ``transpose``, and each slice its own site."""
    keys = jax.random.split(jax.random.PRNGKey(3), 2)
    stack = eqx.filter_vmap(lambda k: eqx.nn.Linear(3, 3, key=k, dtype=F64))(keys)
    params, static = eqx.partition(stack, eqx.is_array)
    x, y = data(n=6)

    def apply_fn(p, x):
        def layer(h, one):
            return jnp.tanh(jax.vmap(eqx.combine(one, static))(h)), None

        return jax.lax.scan(layer, x, p)[0]

    def forward(s):
        h, inputs = x, []
        for i in range(2):
            inputs.append(h)
            h = jnp.tanh(h @ params.weight[i].T + params.bias[i] + s[i])
        return h, inputs

    hand = hand_kfac(forward, [(6, 3), (6, 3)])
    curv = jaxl2.ggn(apply_fn, params, x, y, structure="kron", select="weight", batch_size=4)
    ((a, g),) = curv.ggn
    for i in range(2):
        np.testing.assert_allclose(a[i], hand[i][0], rtol=1e-10)
        np.testing.assert_allclose(g[i], hand[i][1], rtol=1e-10, atol=1e-13)
