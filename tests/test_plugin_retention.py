"""Every logged step reaches the tab, under both of TensorBoard's loaders, with no flags.

TensorBoard keeps 10 tensors per tag for a plugin it does not know (Python
loader) or 100 (Rust loader, ``--load_fast=true``) unless the user passes
``--samples_per_plugin``.  A run of 10,000 logging steps with a layer going dead
at a known deep step and one NaN step must come back from ``findings`` with
all 10,000 steps and both steps exact, from a real ``tensorboard`` process
started with no sampling flags.
"""

from __future__ import annotations

import plugin_helpers as h
import pytest

LOGGED_STEPS = 10_000
LOG_EVERY = 10


@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
    facts = {}

    def build(root: str) -> None:
        facts.update(h.write_long_run(f"{root}/long", logged_steps=LOGGED_STEPS, log_every=LOG_EVERY,
                                      dead_from_index=8_765, nan_index=9_321))

    root = h.session_logdir(tmp_path_factory, "long", build)
    if not facts:  # built earlier in the session: the facts follow from the same arguments
        facts = {"dead_layer": "block3.linear", "dead_step": 87_650, "nan_layer": "block5.linear",
                 "nan_step": 93_210, "last_step": 99_990, "logged_steps": LOGGED_STEPS}
    return root, facts, str(tmp_path_factory.mktemp("tb-work"))


@pytest.mark.slow
@pytest.mark.parametrize("load_fast", [False, True], ids=["python-loader", "rust-loader"])
def test_dead_layer_deep_in_a_10000_step_run_is_reported_at_its_exact_step(long_run, load_fast):
    logdir, facts, workdir = long_run
    with h.TensorBoardProcess(logdir, load_fast=load_fast, workdir=workdir) as tb:
        body = tb.wait_for(
            "/data/plugin/tbdiag/findings?run=long",
            lambda status, b: status == 200 and b["steps"]["count"] == LOGGED_STEPS,
            timeout=120,
        )
        assert body["steps"] == {"count": LOGGED_STEPS, "first": 0, "last": facts["last_step"]}
        got = {(f["issue"], f["layer"]): f for f in body["findings"]}
        dead = got[("dead_relu", facts["dead_layer"])]
        assert dead["first_step"] == facts["dead_step"] and dead["last_step"] == facts["last_step"]
        nan = got[("nonfinite", facts["nan_layer"])]
        assert nan["first_step"] == nan["last_step"] == facts["nan_step"]
        assert set(got) == {("dead_relu", facts["dead_layer"]), ("nonfinite", facts["nan_layer"])}
        # the tab's views see every step too: the heatmap has one column per logged step
        _, heat = h.get_json(tb.url + "/data/plugin/tbdiag/heatmap?run=long&stat=dead_frac")
        assert heat["shape"] == [6, LOGGED_STEPS] and heat["steps"][-1] == facts["last_step"]
