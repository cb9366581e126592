"""tools/bench_accuracy.py: every row trains under one budget, with its recipe's own tools."""

from bench_accuracy import TRAIN, VARIANTS, variant_recipe


def test_a_row_keeps_the_training_tools_its_recipe_ships():
    shipped = variant_recipe(VARIANTS["w2a2_mec"], epochs=1, seed=1)
    assert shipped["train"]["bn_reestimate_batches"] == 100  # on in recipes/w2a2_mec.yaml
    assert shipped["train"]["epochs"] == 1 and shipped["train"]["seed"] == 1  # not the recipe's 20
    assert shipped["train"]["optimizer"] == TRAIN["optimizer"]
    assert shipped["mec"]["enabled"] and shipped["distill"]["enabled"]


def test_a_variant_changes_only_what_it_names():
    without_mec = variant_recipe(VARIANTS["w2a2_mec_nomec"], epochs=1, seed=0)
    assert not without_mec["mec"]["enabled"]
    assert without_mec["train"]["bn_reestimate_batches"] == 100
    assert without_mec["distill"]["enabled"]
    plain = variant_recipe(VARIANTS["w2a2_lsq"], epochs=1, seed=0)
    assert plain["train"].get("bn_reestimate_batches", 0) == 0
    dampened = variant_recipe(VARIANTS["w2a2_lsq_damp"], epochs=1, seed=0)
    assert dampened["train"]["oscillation_dampening"] == 0.001
