"""Server-side optimizers against a NumPy reference (no Spark).

Each optimizer runs ~10 gradient pushes on the server, on a 1,000-element
variable and on a 2,000,000-element one (large enough to be updated by
several threads in chunks). The pulled float32 values ``w`` are compared
with ``ref``, a float64 NumPy implementation of the formulas documented in
docs/protocol.md, fed the same float32 initial values and gradients and the
float32-rounded hyperparameters the server sees. The metric, per variable:

    max|w - ref| / max|ref| <= 1e-6
    and element-wise |w - ref| <= 1e-5 * |ref| + 1e-6 * max|ref|

(a correct float32 server lands around 1e-7 on the first; the absolute term
of the second covers elements that pass close to 0).
"""

from __future__ import annotations

import numpy as np
import pytest

from tensorspark import (
    ParameterServer,
    PSClient,
    TensorSparkValueError,
    VariableNotFoundError,
    generate_secret,
)

SMALL = (10, 100)
BIG = (2_000_000,)  # >= 1M elements: the server's multi-threaded chunk path
STEPS = 10


@pytest.fixture(scope="module")
def client():
    secret = generate_secret()
    with (
        ParameterServer(secret, host="127.0.0.1", update_threads=2) as server,
        PSClient("127.0.0.1", server.port, secret) as c,
    ):
        yield c


def f32(x: float) -> float:
    """A hyperparameter as the server sees it (float32 on the wire)."""
    return float(np.float32(x))


class Reference:
    """The documented update formulas in float64."""

    def __init__(self, name: str, w0: np.ndarray, **hp: float) -> None:
        self.name, self.hp = name, {k: f32(v) for k, v in hp.items()}
        self.w = w0.astype(np.float64)
        init = self.hp.get("initial_accumulator_value", 0.0) if name == "adagrad" else 0.0
        self.s0 = np.full_like(self.w, init)
        self.s1 = np.zeros_like(self.w)
        self.t = 0

    def step(self, grad: np.ndarray, lr: float) -> None:
        g, lr, hp = grad.astype(np.float64), f32(lr), self.hp
        self.t += 1
        if self.name == "sgd":
            self.w -= lr * g
        elif self.name in ("momentum", "nesterov"):
            mu = hp["momentum"]
            self.s0 = mu * self.s0 + g
            self.w -= lr * (self.s0 if self.name == "momentum" else g + mu * self.s0)
        elif self.name == "adagrad":
            self.s0 += g * g
            self.w -= lr * g / (np.sqrt(self.s0) + hp["epsilon"])
        elif self.name in ("adam", "adamw"):
            b1, b2, t = hp["beta_1"], hp["beta_2"], self.t
            if self.name == "adamw":
                self.w -= lr * hp["weight_decay"] * self.w
            self.s0 = b1 * self.s0 + (1 - b1) * g
            self.s1 = b2 * self.s1 + (1 - b2) * g * g
            lr_t = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
            self.w -= lr_t * self.s0 / (np.sqrt(self.s1) + hp["epsilon"])
        elif self.name == "rmsprop":
            rho = hp["rho"]
            self.s0 = rho * self.s0 + (1 - rho) * g * g
            self.w -= lr * g / np.sqrt(self.s0 + hp["epsilon"])
        else:
            raise AssertionError(self.name)


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def assert_matches(got: np.ndarray, want: np.ndarray) -> None:
    assert relative_error(got, want) <= 1e-6
    scale = np.max(np.abs(want))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * scale)


# (optimizer, learning rate, hyperparameters given, all hyperparameters
# with the Keras defaults the client fills in)
CASES = [
    ("sgd", 0.1, {}, {}),
    ("momentum", 0.05, {}, {"momentum": 0.9}),
    ("nesterov", 0.05, {"momentum": 0.8}, {"momentum": 0.8}),
    ("adagrad", 0.1, {}, {"initial_accumulator_value": 0.1, "epsilon": 1e-7}),
    ("adam", 0.01, {"beta_2": 0.99}, {"beta_1": 0.9, "beta_2": 0.99, "epsilon": 1e-7}),
    (
        "adamw",
        0.01,
        {"weight_decay": 0.1},
        {"beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7, "weight_decay": 0.1},
    ),
    ("rmsprop", 0.01, {"rho": 0.95, "epsilon": 1e-6}, {"rho": 0.95, "epsilon": 1e-6}),
]


def register(client: PSClient, prefix: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    init = {
        f"{prefix}/small": rng.standard_normal(SMALL, dtype=np.float32),
        f"{prefix}/big": rng.standard_normal(BIG, dtype=np.float32),
    }
    assert all(client.register(init).values())
    return init


@pytest.mark.parametrize(
    ("name", "lr", "given", "hyperparameters"), CASES, ids=[c[0] for c in CASES]
)
def test_optimizer_matches_numpy_reference(client, name, lr, given, hyperparameters):
    rng = np.random.default_rng([c[0] for c in CASES].index(name))
    init = register(client, name, rng)
    client.set_optimizer(name, learning_rate=lr, variables=list(init), **given)
    refs = {n: Reference(name, w0, **hyperparameters) for n, w0 in init.items()}
    for _ in range(STEPS):
        grads = {n: rng.standard_normal(w0.shape, dtype=np.float32) for n, w0 in init.items()}
        client.push(grads, kind="gradient")
        for n, g in grads.items():
            refs[n].step(g, lr)
    got = client.pull(list(init))
    for n in init:
        assert_matches(got[n], refs[n].w)
        # The optimizer moved the weights well beyond the tolerance.
        assert relative_error(init[n].astype(np.float64), refs[n].w) > 1e-3


def test_learning_rate_change_keeps_adam_slots(client):
    rng = np.random.default_rng(7)
    init = register(client, "adam-schedule", rng)
    names = list(init)
    adam = {"beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7}  # the defaults
    refs = {n: Reference("adam", w0, **adam) for n, w0 in init.items()}
    restarted: dict[str, Reference] = {}  # filled at the rate change

    def push(lr: float, override: float = 0.0) -> None:
        grads = {n: rng.standard_normal(w0.shape, dtype=np.float32) for n, w0 in init.items()}
        client.push(grads, kind="gradient", learning_rate=override)
        for n, g in grads.items():
            refs[n].step(g, override or lr)
            if n in restarted:
                restarted[n].step(g, override or lr)

    client.set_optimizer("adam", learning_rate=0.01, variables=names)
    for _ in range(5):
        push(0.01)
    # The schedule: same optimizer, new rate. Moments and t carry on.
    client.set_optimizer("adam", learning_rate=0.001, variables=names)
    for n in names:  # what a reset would have done instead
        restarted[n] = Reference("adam", refs[n].w.astype(np.float32), **adam)
    for _ in range(4):
        push(0.001)
    push(0.001, override=0.0005)  # a push's own rate wins for that push
    got = client.pull(names)
    for n in names:
        assert_matches(got[n], refs[n].w)
        assert relative_error(got[n], restarted[n].w) > 1e-5


def test_default_optimizer_covers_later_variables_and_kind_change_resets(client):
    # A separate server: "every variable" must not touch the other tests'.
    secret = generate_secret()
    with (
        ParameterServer(secret, host="127.0.0.1") as server,
        PSClient("127.0.0.1", server.port, secret) as c,
    ):
        w0 = np.linspace(-1, 1, 50, dtype=np.float32)
        g = np.full(50, 0.5, np.float32)
        c.register({"early": w0})
        with pytest.raises(TensorSparkValueError, match="learning_rate"):
            c.push({"early": g}, kind="gradient")  # no optimizer, no rate
        assert c.set_optimizer("momentum", learning_rate=0.1) == 0
        c.register({"late": w0})
        c.push({"early": g, "late": g}, kind="gradient")
        c.push({"early": g, "late": g}, kind="gradient")
        ref = Reference("momentum", w0, momentum=0.9)
        ref.step(g, 0.1)
        ref.step(g, 0.1)
        got = c.pull()
        assert_matches(got["early"], ref.w)
        assert_matches(got["late"], ref.w)
        # Another kind resets the slots: momentum starts again from zero.
        c.set_optimizer("nesterov", learning_rate=0.1, variables=["late"])
        c.push({"late": g}, kind="gradient")
        ref_late = Reference("nesterov", got["late"], momentum=0.9)
        ref_late.step(g, 0.1)
        assert_matches(c.pull(["late"])["late"], ref_late.w)


def test_bad_optimizer_arguments_are_rejected_and_change_nothing(client):
    client.register({"guarded": np.ones(4, np.float32)})
    client.set_optimizer("sgd", learning_rate=0.5, variables=["guarded"])
    with pytest.raises(TensorSparkValueError, match="unknown optimizer 'lion'"):
        client.set_optimizer("lion", learning_rate=0.1)
    with pytest.raises(TensorSparkValueError, match="takes no hyperparameter 'rho'"):
        client.set_optimizer("adam", learning_rate=0.1, variables=["guarded"], rho=0.9)
    with pytest.raises(TensorSparkValueError, match="learning_rate"):
        client.set_optimizer("adam", learning_rate=-1.0, variables=["guarded"])
    with pytest.raises(TensorSparkValueError, match="beta1"):
        client.set_optimizer("adam", learning_rate=0.1, variables=["guarded"], beta_1=1.0)
    with pytest.raises(TensorSparkValueError, match="must be a number"):
        client.set_optimizer("momentum", learning_rate=0.1, variables=["guarded"], momentum="x")
    with pytest.raises(TensorSparkValueError, match="list of names"):
        client.set_optimizer("adam", learning_rate=0.1, variables="guarded")
    with pytest.raises(VariableNotFoundError, match="nope"):
        client.set_optimizer("adam", learning_rate=0.1, variables=["guarded", "nope"])
    # Still SGD with rate 0.5: 1 - 0.5 * 1.
    client.push({"guarded": np.ones(4, np.float32)}, kind="gradient")
    np.testing.assert_array_equal(client.pull(["guarded"])["guarded"], np.full(4, 0.5))
    assert client.connected
