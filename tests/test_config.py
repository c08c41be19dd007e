import pytest

from betadiff.config import (ConfigError, config_hash, config_keys, flatten, from_dict, load_config,
                             merge_overrides, to_dict)


def test_shipped_configs_load():
    from betadiff.config import CONFIG_DIR
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert {"toy1_beta", "toy1_gaussian", "toy2_beta", "toy2_gaussian", "mixture2d_beta", "mixture2d_gaussian",
            "fashion_mnist_beta", "fashion_mnist_gaussian", "toy1_beta_authors"} <= set(names)
    for n in names:
        load_config(n)


def test_base_chain_and_overrides():
    c = load_config("toy2_gaussian", ["train.steps=7", "optim.lr=0.01"])
    assert (c.data.name, c.diffusion.kind, c.diffusion.loss, c.train.steps, c.optim.lr) == \
        ("toy2", "gaussian", "eps_mse", 7, 0.01)
    assert c.model.width == 256  # inherited from toy1_beta through two bases


@pytest.mark.parametrize("override,fragment", [
    ("foo.bar=1", "key 'foo'"),
    ("train.steps=abc", "train.steps"),
    ("diffusion.eta=0", "diffusion.eta"),
    ("diffusion.eta=-3", "diffusion.eta"),
    ("diffusion.c1=11", "diffusion.c1"),
    ("diffusion.omega=1.5", "diffusion.omega"),
    ("diffusion.omega=-0.1", "diffusion.omega"),
    ("data.shift=-0.1", "data.shift"),
    ("diffusion.loss=eps_mse", "diffusion.loss"),
    ("data.name=nope", "data.name"),
])
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config("toy1_beta", [override])
    msg = str(e.value)
    assert fragment in msg and "toy1_beta.yaml" in msg and "\n" not in msg


def test_scale_plus_shift_must_stay_below_one():
    with pytest.raises(ConfigError, match="scale \\+ shift must be < 1"):
        load_config("toy1_beta", ["data.scale=0.5", "data.shift=0.5"])
    load_config("toy1_beta", ["data.scale=0.39", "data.shift=0.6"])


def test_unknown_key_in_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match="train.stepz"):
        load_config(p)


def test_roundtrip_flatten_hash():
    c = load_config("toy1_beta")
    assert from_dict(to_dict(c)) == c
    assert config_hash(c) == config_hash(load_config("toy1_beta"))
    assert config_hash(c) != config_hash(merge_overrides(c, {"train.seed": 1}))
    assert "diffusion.eta" in config_keys(c) and flatten(c)["diffusion.eta"] == 10000.0
    with pytest.raises(ConfigError, match="nope"):
        merge_overrides(c, {"nope.x": 1})
