import dataclasses
from pathlib import Path

import pytest

from charrnn_keras.config import Config, ConfigError, load_config, parse_override

# Every file in configs/, so a new one cannot ship unloaded.
CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
REPO_CONFIGS = sorted(p.stem for p in CONFIGS_DIR.glob("*.toml"))


def test_the_configs_directory_is_found():
    assert {"default", "shakespeare", "anna", "tiny", "shakespeare_fast"} <= set(REPO_CONFIGS)


@pytest.mark.parametrize("name", REPO_CONFIGS)
def test_shipped_configs_load(name):
    from conftest import REPO

    cfg = load_config(REPO / "configs" / f"{name}.toml")
    assert cfg.model.num_layers >= 1


def test_the_float32_fast_config_is_the_fast_one_with_float32_its_learning_rate_and_dropout():
    from conftest import REPO

    fast = load_config(REPO / "configs" / "shakespeare_fast.toml")
    f32 = load_config(REPO / "configs" / "shakespeare_fast_float32.toml")
    assert f32.data == fast.data
    assert f32.model == dataclasses.replace(fast.model, matmul_dtype="float32", dropout=0.2)
    assert f32.train == dataclasses.replace(fast.train, learning_rate=0.003)


def test_seed_configs_match_the_notebooks():
    from conftest import REPO

    s = load_config(REPO / "configs" / "shakespeare.toml")
    assert (s.data.batch_size, s.data.seq_length) == (60, 50)
    assert (s.model.num_layers, s.model.rnn_size) == (2, 128)
    assert (s.train.learning_rate, s.train.lr_decay, s.train.grad_clip) == (0.002, 0.97, 5.0)
    a = load_config(REPO / "configs" / "anna.toml")
    assert (a.data.batch_size, a.data.seq_length, a.data.val_fraction) == (100, 100, 0.1)
    assert (a.model.num_layers, a.model.rnn_size, a.model.dropout) == (2, 512, 0.5)
    assert (a.train.learning_rate, a.train.grad_clip) == (0.001, 5.0)


def test_default_toml_matches_dataclass_defaults():
    from conftest import REPO

    assert load_config(REPO / "configs" / "default.toml") == Config()


def test_overrides_are_typed_and_applied():
    cfg = load_config(
        None,
        ["train.epochs=3", "model.cell=gru", "train.learning_rate=1e-3", "train.max_minutes=2"],
    )
    assert cfg.train.epochs == 3
    assert cfg.model.cell == "gru"
    assert cfg.train.learning_rate == 0.001
    assert cfg.train.max_minutes == 2.0 and isinstance(cfg.train.max_minutes, float)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epoch=3", "unknown key train.epoch"),
        ("training.epochs=3", "unknown section [training]"),
        ("train.epochs=three", "train.epochs must be int"),
        ("train.epochs=2.5", "train.epochs must be int"),
        ("train.epochs=true", "train.epochs must be int"),
        ("train.epochs=0", "train.epochs must be greater than 0"),
        ("data.batch_size=-4", "data.batch_size must be greater than 0"),
        ("train.learning_rate=0", "train.learning_rate must be greater than 0"),
        ("train.learning_rate=nan", "train.learning_rate must be greater than 0"),
        ("data.val_fraction=1.0", "data.val_fraction must be in [0, 1)"),
        ("model.cell=transformer", "model.cell must be one of lstm, gru, rnn"),
        ("model.matmul_dtype=float16", "model.matmul_dtype must be one of float32, bfloat16"),
        ("model.time_chunks=0", "model.time_chunks must be greater than 0"),
        ("train.inter_op_threads=-1", "train.inter_op_threads must be 0 or more"),
        ("epochs=3", "the key must be section.key"),
        ("train.epochs", "expected section.key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_config_round_trips_through_toml(tmp_path):
    cfg = load_config(None, ["model.cell=rnn", "train.epochs=7", "data.val_fraction=0.25"])
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    assert load_config(path) == cfg


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nepochs = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_parse_override_reads_toml_values():
    assert parse_override("train.seed=7") == ("train", "seed", 7)
    assert parse_override('model.cell="lstm"') == ("model", "cell", "lstm")


def test_fast_lstm_settings_need_an_lstm_cell():
    # fast_lstm itself is on by default and only concerns LSTM layers; its own keys need both.
    assert load_config(None, ["model.cell=gru"]).model.fast_lstm
    with pytest.raises(ConfigError, match='needs model.cell = "lstm" and model.fast_lstm'):
        load_config(None, ["model.matmul_dtype=bfloat16", "model.cell=gru"])
    with pytest.raises(ConfigError, match="got cell 'lstm' and fast_lstm false"):
        load_config(None, ["model.fast_lstm=false", "model.time_chunks=2"])
    cfg = load_config(None, ["model.matmul_dtype=auto"])
    assert cfg.model.fast_lstm and cfg.model.matmul_dtype == "auto"
