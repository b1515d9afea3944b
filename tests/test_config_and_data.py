import pytest

from fedsim.config import load_config
from fedsim.data.shakespeare import ShakespeareStore, parse_play
from fedsim.errors import ConfigError


def test_defaults_and_overrides(tmp_path):
    cfg = load_config("configs/default.yaml", ["dp.epsilon=2", "uls.server_optimizer=adam", "run.rounds=7"])
    assert cfg.dp.epsilon == 2.0 and cfg.uls.server_optimizer == "adam" and cfg.run.rounds == 7


@pytest.mark.parametrize("override,key", [
    ("dp.epsilon=0", "dp.epsilon"), ("dp.epsilon=-1", "dp.epsilon"), ("dp.delta=1", "dp.delta"),
    ("dp.delta=1.5", "dp.delta"), ("dp.clip_norm=0", "dp.clip_norm"), ("uls.expected_cohort=0", "uls.expected_cohort"),
    ("dp.bogus=1", "dp.bogus"), ("run.rounds=abc", "run.rounds"), ("dp.accountant=magic", "dp.accountant"),
])
def test_invalid_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as exc:
        load_config("configs/default.yaml", [override])
    assert key in str(exc.value)


def test_missing_config_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed")
    with pytest.raises(ConfigError, match="YAML"):
        load_config(bad)


def test_parse_play_splits_speeches_by_speaker(tmp_path):
    md = tmp_path / "tiny-play.md"
    md.write_text("# Tiny\n\n## ACT I\n\n_Enter A_\n\n**ALICE**  \nHello there,  \nfriend.\n\n**BOB**  \nHi.\n\n"
                  "## ACT II\n\n**Alice**  \nBye.\n")
    sp = parse_play(md)
    assert [(s.speaker, s.text) for s in sp] == [("ALICE", "Hello there,\nfriend."), ("BOB", "Hi."), ("ALICE", "Bye.")]


def test_shakespeare_store_users_splits_and_public_plays():
    s = ShakespeareStore(public_plays=5, min_examples=4, test_fraction=0.2, seed=0)
    assert s.num_users > 500
    assert len(s.public_play_names) == 5
    users_plays = {s.user_name(u).split("/")[0] for u in range(s.num_users)}
    assert not users_plays & set(s.public_play_names)  # public plays belong to nobody
    for u in range(0, s.num_users, 37):
        tr, te = s.train_examples(u), s.test_examples(u)
        assert len(tr) >= 1 and len(te) >= 1 and len(tr) + len(te) >= 4
    assert len(s.public_examples()) > 1000
    with pytest.raises(IndexError):
        s.train_examples(s.num_users)
