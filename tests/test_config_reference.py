"""The config reference (`fedsim config show | docs`, docs/config.md) is generated from the models."""

from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from fedsim import config
from fedsim.cli import main
from fedsim.config_reference import allowed as reference_allowed
from fedsim.config_reference import config_models, markdown, sections

ROOT = Path(__file__).resolve().parents[1]


def _all_models() -> set[type[BaseModel]]:
    """Every model of fedsim/config.py, reachable from ExperimentConfig or not."""
    found, todo = set(config_models()), [config._Strict]
    while todo:
        cls = todo.pop()
        found.update(cls.__subclasses__())
        todo += cls.__subclasses__()
    return found


def test_every_config_field_has_a_description():
    missing = [f"{model.__name__}.{name}" for model in _all_models() for name, field in model.model_fields.items()
               if not (field.description or "").strip()]
    assert not missing, f"config fields without a Field(description=...): {missing}"


def test_the_reference_lists_every_key_of_the_config():
    def leaves(node: BaseModel, prefix: str = "") -> set[str]:
        out = set()
        for name in type(node).model_fields:
            value = getattr(node, name)
            out |= leaves(value, f"{prefix}{name}.") if isinstance(value, BaseModel) else {prefix + name}
        return out

    from fedsim.config_reference import _optional_model

    # a `Model | None` key that is null by default (dp.adaptive_clip) has its keys listed too
    optional = {f"dp.{key}.{name}" for key, field in config.DpConfig.model_fields.items()
                if (sub := _optional_model(field)) is not None for name in sub.model_fields}
    assert "dp.adaptive_clip.target_quantile" in optional

    listed = [key.path for section in sections() for key in section.keys]
    assert len(listed) == len(set(listed))
    assert set(listed) == leaves(config.ExperimentConfig()) | optional
    assert {"model.arch", "simulation.faults", "dp"} <= {s.path for s in sections()}


def test_allowed_values_come_from_pydantic():
    allowed = {key.path: key.allowed for section in sections() for key in section.keys}
    assert allowed["data.public_plays"] == "int in [0, 30]"
    assert allowed["data.test_fraction"] == "float in (0, 1)"
    assert allowed["dp.delta"] == "float in (0, 1) or null"
    assert allowed["dp.noise_multiplier"] == "float >= 0 or null"
    assert allowed["els.accounting_interval"] == "float in (0, 0.1]"
    assert allowed["dp.accountant"] == "one of pld, rdp, prv, edgeworth, lmo_faithful"
    assert allowed["model.lora.target_modules"] == "list[str] or null"
    assert allowed["run.tensorboard"] == "bool"

    class Example(BaseModel):
        kinds: list[Literal["a", "b"]] = Field(["a"], min_length=1)
        names: list[str] | None = Field(None, max_length=3)

    assert reference_allowed(Example.model_fields["kinds"]) == "a list of a, b, at least 1"
    assert reference_allowed(Example.model_fields["names"]) == "list[str], at most 3 or null"


def test_docs_config_md_is_the_generated_reference(capsys):
    """Regenerate with `fedsim config docs > docs/config.md` when a config field changes."""
    assert main(["config", "docs"]) == 0
    out = capsys.readouterr().out
    assert out == markdown()
    assert out.encode("utf-8") == (ROOT / "docs" / "config.md").read_bytes()


def test_config_show_prints_the_overridden_value_and_the_default(capsys):
    assert main(["config", "show", "configs/smoke.yaml", "--set", "dp.epsilon=2.5", "--set", "model.arch.n_head=4"]) == 0
    out = capsys.readouterr().out
    assert "  dp.epsilon = 2.5  (default 8.0; float > 0 or null)\n" in out
    assert "  model.arch.n_head = 4  (default 2; int >= 1)\n" in out
    assert "  run.rounds = 3  (default 30; int >= 1)\n" in out  # from smoke.yaml
    assert "      target user-level epsilon for the planned rounds (None: non-private)\n" in out
    assert "[simulation.faults] Fault injection" in out
    assert max(map(len, out.splitlines())) <= 80


def test_config_show_without_a_config_shows_the_defaults(capsys):
    assert main(["config", "show"]) == 0
    out = capsys.readouterr().out
    assert "  dp.epsilon = 8.0  (default; float > 0 or null)\n" in out
    assert all(f"\n  {key.path} = " in out for section in sections() for key in section.keys)


@pytest.mark.parametrize("args,needle", [
    (["configs/smoke.yaml", "--set", "dp.epsilon=-1"], "dp.epsilon"),
    (["configs/smoke.yaml", "--set", "dp.nonsense=1"], "dp.nonsense: unknown key"),
    (["no-such.yaml"], "no-such.yaml not found"),
    (["--bogus"], "unrecognized arguments"),
])
def test_config_show_refuses_a_bad_config_in_one_line(capsys, args, needle):
    assert main(["config", "show", *args]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0]
    assert captured.out == ""
