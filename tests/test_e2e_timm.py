"""timm's own RepVGG-A0, MobileOne-S0 and RepViT-M0.9 (their depths, a quarter of their widths) and
LeViT-128S (a quarter of its width, one block per stage: its Linear+BN through Flatten/Reshape),
BN statistics averaged over natural-image crops, exported as users export them
(models/timm_fixtures.py): every exact rewrite is kept and the deploy structure is reached, in
float32 and in float16 (model.half(), and float16 inside with float32 inputs and outputs), and the
report gives both models' distances from the float64 evaluation. And every other
re-parameterizable timm family, small, against timm's reparameterize_model counts."""
from __future__ import annotations

import pytest
from conftest import FIXTURES, fixture_manifest, verified_fixture

MANIFEST = fixture_manifest("timm_manifest.json")


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_a_timm_export_reaches_its_deploy_structure_with_every_exact_rewrite_kept(name):
    _, report, ops = verified_fixture(FIXTURES / name)
    deploy = MANIFEST[name]["deploy"]
    assert ops["Conv"] == deploy["Conv"] and ops["BatchNormalization"] == deploy["BatchNormalization"] == 0
    assert ops["Add"] <= deploy["Add"]  # LeViT: its folded BN shifts join the next Add, not one Add each
    logits = report.verification.outputs[0]
    assert logits.ours is not None and logits.theirs is not None
    assert "from float64, the input model" in report.verification.summary()


FAMILIES = fixture_manifest("timm_families/manifest.json")


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_other_timm_family_reaches_its_reparameterize_model_counts(name):
    # the other re-parameterizable timm families, narrow and shallow by their own arguments
    # (models/timm_family_fixtures.py; NextViT as its own blocks, its widths being fixed): timm's
    # reparameterize_model export's Conv count, and no more BatchNormalization or Add (NextViT's
    # final BN goes into the classifier through the pooling, where timm keeps it)
    _, report, ops = verified_fixture(FIXTURES / "timm_families" / name)
    deploy = FAMILIES[name]["deploy"]
    assert ops["Conv"] == deploy["Conv"], report.summary(verbose=True)
    assert ops["BatchNormalization"] <= deploy["BatchNormalization"] and ops["Add"] <= deploy["Add"]
