"""Stage planning, stage names, settings checks and the command line written into reports."""
from __future__ import annotations

import pytest

from dsr1.config import parse_option_items as parse_options
from dsr1.errors import Dsr1Error
from dsr1.tasks.prune.schedule import PruneSettings, check_settings, plan_stages, stage_name

#: (schedule settings, strategy minimum, expected stages)
PLANS: dict[str, tuple[dict[str, object], float, list[float]]] = {
    "once": ({"target_sparsity": 0.5}, 0.0, [0.5]),
    "once_dense": ({"target_sparsity": 0.0}, 0.0, [0.0]),
    "progressive_default": ({"target_sparsity": 0.5, "schedule": "progressive"}, 0.0, [0.1, 0.2, 0.3, 0.4, 0.5]),
    "progressive_to_70": ({"target_sparsity": 0.7, "schedule": "progressive"}, 0.0,
                          [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]),
    "progressive_off_grid": ({"target_sparsity": 0.35, "schedule": "progressive"}, 0.0, [0.1, 0.2, 0.3, 0.35]),
    "progressive_small": ({"target_sparsity": 0.05, "schedule": "progressive"}, 0.0, [0.05]),
    "explicit_target_appended": ({"target_sparsity": 0.5, "schedule": "progressive", "stages": [0.25]}, 0.0,
                                 [0.25, 0.5]),
    "explicit_ends_at_target": ({"target_sparsity": 0.5, "schedule": "progressive", "stages": [0.3, 0.5]}, 0.0,
                                [0.3, 0.5]),
    "semi24_from_half": ({"target_sparsity": 0.7, "schedule": "progressive"}, 0.5, [0.5, 0.6, 0.7]),
    "semi24_at_half": ({"target_sparsity": 0.5, "schedule": "progressive"}, 0.5, [0.5]),
}


@pytest.mark.parametrize("case", list(PLANS))
def test_plan(case: str) -> None:
    fields, minimum, expected = PLANS[case]
    settings = PruneSettings(model="m", output_dir="o", **fields)  # type: ignore[arg-type]
    check_settings(settings)
    assert plan_stages(settings, minimum) == expected


def test_stage_names() -> None:
    assert [stage_name(s) for s in (0.0, 0.1, 0.5, 0.125, 0.7)] == [
        "stage-0.00", "stage-0.10", "stage-0.50", "stage-0.125", "stage-0.70"]
    settings = PruneSettings(model="m", output_dir="o", target_sparsity=0.5, schedule="progressive",
                             stages=[0.1, 0.1004])
    with pytest.raises(Dsr1Error, match="name the same stage dir twice"):
        plan_stages(settings)


def test_settings_forbid_unknown_keys_and_round_trip() -> None:
    settings = PruneSettings(model="m", output_dir="o", target_sparsity=0.5, strategy="wanda")
    assert PruneSettings.model_validate_json(settings.model_dump_json()) == settings
    with pytest.raises(ValueError, match="extra"):
        PruneSettings(model="m", output_dir="o", target_sparsity=0.5, sparsity=0.5)  # type: ignore[call-arg]


def test_options_parse_json_values() -> None:
    assert parse_options(["scope=global", "sequential=false", "skip=[\"lm_head\", \"pooler\"]"]) == {
        "scope": "global", "sequential": False, "skip": ["lm_head", "pooler"]}
