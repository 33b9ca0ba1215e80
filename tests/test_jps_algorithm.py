"""JPS and the CLIP baselines as DomainBed algorithms, in process."""

import pytest
import torch

from domainbed_support import requires_domainbed, tiny_hparams

pytestmark = [requires_domainbed, pytest.mark.domainbed]

INPUT_SHAPE = (3, 32, 32)
NUM_CLASSES = 5
NUM_DOMAINS = 3


def algorithm_class(name):
    from domainbed import algorithms

    return algorithms.get_algorithm_class(name)


def make_steps(count, seed=0, batch_size=8):
    generator = torch.Generator().manual_seed(seed)
    return [[(torch.randn(batch_size, *INPUT_SHAPE, generator=generator) + domain,
              torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator))
             for domain in range(NUM_DOMAINS)]
            for _ in range(count)]


def build(name, seed=0, source_minibatches=None, **overrides):
    torch.manual_seed(seed)
    hparams = tiny_hparams(name, "VLCS", head_init="random", **overrides)
    extra = {} if source_minibatches is None else {"source_minibatches": source_minibatches}
    return algorithm_class(name)(INPUT_SHAPE, NUM_CLASSES, NUM_DOMAINS, hparams, **extra)


def test_init_and_update_paths_give_same_mask():
    steps = make_steps(2)
    at_init = build("JPS", source_minibatches=steps)
    in_update = build("JPS")
    before_first_step = [param.detach().clone() for param in in_update.parameters()]

    result = in_update.update(steps[0])
    assert in_update.mask is None
    assert "loss" in result
    for param, before in zip(in_update.parameters(), before_first_step):
        assert torch.equal(param, before)

    in_update.update(steps[1])
    assert in_update.mask is not None
    assert in_update.mask.num_selected == 20
    assert in_update.mask.equals(at_init.mask)


def test_update_path_selects_before_any_weight_moves():
    from jps_domainbed.masked_training import weights_hash

    algorithm = build("JPS")
    network = torch.nn.ModuleList([algorithm.featurizer, algorithm.classifier])
    hashes_at_selection = []
    original = algorithm.build_mask

    def spy(steps):
        hashes_at_selection.append(weights_hash(network))
        return original(steps)

    initial = weights_hash(network)
    algorithm.build_mask = spy
    for step in make_steps(4):
        algorithm.update(step)
    assert hashes_at_selection == [initial]
    assert weights_hash(network) != initial


def test_test_environment_never_reaches_selection_or_training():
    # The test environment is poisoned with NaN: if any of it reached the
    # selection gradients, selection would raise, and if it reached a training
    # step the weights would turn NaN.
    algorithm = build("JPS")
    poisoned = torch.full((8, *INPUT_SHAPE), float("nan"))
    for step in make_steps(6):
        algorithm.update(step)
        logits = algorithm.predict(poisoned)
        assert torch.isnan(logits).all()
    for name, param in algorithm.named_parameters():
        assert torch.isfinite(param).all(), name
    assert algorithm.mask is not None


def test_nan_source_batch_names_domain():
    algorithm = build("JPS")
    steps = make_steps(2)
    steps[1][2][0][0] = float("nan")
    algorithm.update(steps[0])
    with pytest.raises(FloatingPointError, match="source domain 2"):
        algorithm.update(steps[1])


def test_k_larger_than_candidates_rejected():
    with pytest.raises(ValueError, match="k=50000 is larger than the 32768 candidate"):
        build("JPS", jps_k=50000)


def test_invalid_jps_settings_name_hparams():
    with pytest.raises(ValueError, match="jps_update must be one of .*'sprase'.*jps_update"):
        build("JPS", jps_update="sprase")
    with pytest.raises(ValueError, match=r"rho must be in \(0, 1\], got 1.5.*jps_rho \(rho\)"):
        build("JPS", jps_rho=1.5)
    with pytest.raises(ValueError, match="unknown open_clip model name 'ViT-B-61'.*hparams clip_model"):
        build("JPS", clip_model="ViT-B-61")


def test_checkpoint_before_selection_warns(caplog):
    algorithm = build("JPS")
    algorithm.update(make_steps(1)[0])
    with caplog.at_level("WARNING", logger="jps_domainbed.algorithms"):
        state = algorithm.state_dict()
        algorithm.state_dict()
    assert state["mask"] is None
    assert caplog.text.count("JPS checkpoint without a mask") == 1
    assert "needs 2 update calls (jps_selection_batches) and 1 happened" in caplog.text


def test_build_mask_bad_steps_rejected():
    algorithm = build("JPS")
    with pytest.raises(ValueError, match="needs 2 minibatches per source domain .*got 1"):
        algorithm.build_mask(make_steps(1))
    steps = make_steps(2)
    steps[1] = steps[1][:2]
    with pytest.raises(ValueError, match="selection step 1 has 2 minibatches, one per source domain"):
        algorithm.build_mask(steps)
    algorithm.build_mask(make_steps(2))
    with pytest.raises(RuntimeError, match="already built"):
        algorithm.build_mask(make_steps(2))


def test_checkpoint_with_other_mask_rejected():
    first = build("JPS")
    first.build_mask(make_steps(2, seed=0))
    second = build("JPS")
    second.build_mask(make_steps(2, seed=9))
    assert not first.mask.equals(second.mask)
    before = {name: param.clone() for name, param in second.featurizer.named_parameters()}
    with pytest.raises(ValueError, match="already has a different mask; load the checkpoint into a new JPS"):
        second.load_state_dict(first.state_dict())
    for name, param in second.featurizer.named_parameters():
        assert torch.equal(param, before[name]), name


def test_missing_hparams_rejected():
    hparams = tiny_hparams("JPS", "VLCS")
    del hparams["clip_model"]
    with pytest.raises(KeyError, match="clip_model"):
        algorithm_class("JPS")(INPUT_SHAPE, NUM_CLASSES, NUM_DOMAINS, hparams)


def test_state_dict_restores_mask_without_selection():
    algorithm = build("JPS")
    steps = make_steps(5)
    for step in steps:
        algorithm.update(step)
    state = algorithm.state_dict()
    assert state["encoder"] is not None  # random init is saved whole

    restored = build("JPS", seed=1)
    restored.build_mask = None  # selection must not run again
    restored.load_state_dict(state)
    assert restored.mask.equals(algorithm.mask)
    x = steps[0][0][0]
    assert torch.equal(restored.predict(x), algorithm.predict(x))


def test_checkpoint_with_pretrained_file_is_small(tmp_path):
    from jps_domainbed.clip_featurizer import CLIPSpec, load_clip_model

    torch.manual_seed(11)
    weights = tmp_path / "tiny.pt"
    torch.save(load_clip_model(CLIPSpec("jps-vit-tiny", "none", 32)).state_dict(), weights)
    algorithm = build("JPS", clip_pretrained=str(weights))
    steps = make_steps(4)
    for step in steps:
        algorithm.update(step)
    state = algorithm.state_dict()
    assert state["encoder"] is None
    assert algorithm.masked.base_hash == algorithm.encoder_hash
    path = tmp_path / "model.pkl"
    torch.save({"model_dict": state}, path)
    assert path.stat().st_size < 30_000

    restored = build("JPS", seed=5, clip_pretrained=str(weights))
    restored.load_state_dict(torch.load(path)["model_dict"])
    assert restored.mask.equals(algorithm.mask)
    x = steps[0][1][0]
    assert torch.equal(restored.predict(x), algorithm.predict(x))

    torch.manual_seed(12)
    torch.save(load_clip_model(CLIPSpec("jps-vit-tiny", "none", 32)).state_dict(), weights)
    other = build("JPS", clip_pretrained=str(weights))
    with pytest.raises(ValueError, match="differ from those the checkpoint was trained on"):
        other.load_state_dict(state)


def test_zero_shot_head_uses_class_names():
    from jps_domainbed.class_names import class_names

    torch.manual_seed(0)
    hparams = tiny_hparams("JPS", "PACS")
    assert hparams["head_init"] == "zeroshot"
    algorithm = algorithm_class("JPS")(INPUT_SHAPE, 7, NUM_DOMAINS, hparams)
    weight = algorithm.classifier.linear.weight
    norms = weight.norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, norms[0].item()))
    assert len(class_names("PACS", 7)) == 7
    with pytest.raises(ValueError, match="7 class names are known for 'PACS'"):
        algorithm_class("JPS")(INPUT_SHAPE, 5, NUM_DOMAINS, hparams)


def test_zero_shot_head_unknown_dataset_rejected():
    hparams = tiny_hparams("JPS", "ColoredMNIST", head_init="zeroshot")
    with pytest.raises(ValueError, match="class names of dataset 'ColoredMNIST' are unknown"):
        algorithm_class("JPS")(INPUT_SHAPE, 2, NUM_DOMAINS, hparams)


@pytest.mark.parametrize("name, overrides", [
    ("JPS", {"jps_update": "sparse"}), ("JPS", {"jps_update": "dense"}),
    ("CLIP_ERM", {}), ("CLIP_LinearProbe", {})])
def test_update_predict_round_trip(name, overrides):
    algorithm = build(name, **overrides)
    steps = make_steps(4)
    losses = [algorithm.update(step)["loss"] for step in steps]
    assert all(loss == loss for loss in losses)
    x = steps[0][0][0]
    logits = algorithm.predict(x)
    assert logits.shape == (8, NUM_CLASSES)

    restored = build(name, seed=3, **overrides)
    restored.load_state_dict(algorithm.state_dict())
    assert torch.equal(restored.predict(x), logits)


def test_linear_probe_keeps_encoder():
    algorithm = build("CLIP_LinearProbe")
    before = {name: param.clone() for name, param in algorithm.featurizer.named_parameters()}
    head_before = algorithm.classifier.linear.weight.clone()
    for step in make_steps(3):
        algorithm.update(step)
    for name, param in algorithm.featurizer.named_parameters():
        assert torch.equal(param, before[name]), name
    assert not torch.equal(algorithm.classifier.linear.weight, head_before)


def test_erm_changes_whole_encoder():
    algorithm = build("CLIP_ERM")
    before = {name: param.clone() for name, param in algorithm.featurizer.named_parameters()}
    for step in make_steps(2):
        algorithm.update(step)
    changed = [name for name, param in algorithm.featurizer.named_parameters()
               if not torch.equal(param, before[name])]
    assert len(changed) == len(before)


def test_checkpoint_of_other_algorithm_rejected():
    erm = build("CLIP_ERM")
    with pytest.raises(ValueError, match="'CLIP_ERM' cannot be loaded into JPS"):
        build("JPS").load_state_dict(erm.state_dict())
