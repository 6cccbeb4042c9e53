import pytest
import torch

from mopc import MoPConfig, MoPConfigError


def test_defaults_are_valid():
    config = MoPConfig.from_options(None)
    assert config.lowering == "auto" and config.partitioner == "min_cut"


def test_unknown_option_names_it_and_suggests():
    with pytest.raises(MoPConfigError, match=r"unknown mop option 'lowerin'.*Did you mean 'lowering'"):
        MoPConfig.from_options({"lowerin": "eager"})


def test_unknown_option_lists_accepted():
    with pytest.raises(MoPConfigError, match=r"Accepted options: .*dump_dir.*lowering"):
        MoPConfig.from_options({"zzz": 1})


@pytest.mark.parametrize(
    "options, pattern",
    [
        ({"lowering": "fast"}, r"lowering='fast' is not accepted; use one of 'auto', 'eager', 'inductor'"),
        ({"partitioner": 3}, r"partitioner=3 is not accepted; use one of 'min_cut', 'default'"),
        ({"debug": "yes"}, r"debug='yes' must be True or False"),
        ({"dump_dir": 5}, r"dump_dir=5 must be"),
        ({"disable_passes": 3}, r"disable_passes=3 must be a tuple of str"),
    ],
)
def test_bad_values_name_field_value_and_accepted(options, pattern):
    with pytest.raises(MoPConfigError, match=pattern):
        MoPConfig.from_options(options)


def test_options_must_be_a_mapping():
    with pytest.raises(MoPConfigError, match="options must be a dict"):
        MoPConfig.from_options(["lowering"])


def test_list_of_disabled_passes_is_accepted_and_frozen():
    config = MoPConfig.from_options({"disable_passes": ["count_costs"]})
    assert config.disable_passes == ("count_costs",)
    with pytest.raises(Exception):
        config.debug = True  # frozen


def test_bad_option_fails_the_compile_with_the_message():
    model = torch.nn.Linear(4, 4)
    compiled = torch.compile(model, backend="mop", options={"lowering": "fast"})
    with pytest.raises(Exception, match="lowering='fast' is not accepted"):
        compiled(torch.randn(2, 4))


@pytest.mark.parametrize(
    "options, pattern",
    [
        ({"offload": "auto"}, r"offload='auto' chooses save, recompute or offload under a device budget, but "
                              r"memory_budget_gb=None; set memory_budget_gb \(GiB per rank"),
        ({"offload": "auto", "memory_budget_gb": 0.0}, r"memory_budget_gb=0.0 must be a positive finite number"),
        ({"offload": "auto", "memory_budget_gb": float("inf")}, r"memory_budget_gb=inf must be a positive finite"),
        ({"offload": "auto", "memory_budget_gb": -2}, r"memory_budget_gb=-2 must be a positive finite number"),
        ({"offload": "auto", "memory_budget_gb": "40"}, r"memory_budget_gb='40' must be"),
        ({"memory_budget_gb": 40.0}, r"memory_budget_gb=40.0 acts only with offload='auto', but offload='none'; "
                                     r"set offload='auto' or drop memory_budget_gb"),
        ({"offload": "experts", "memory_budget_gb": 40.0}, r"acts only with offload='auto', but offload='experts'"),
        ({"memory_policy_hardware": "h100"}, r"memory_policy_hardware='h100' acts only with offload='auto'"),
        ({"offload": "auto", "memory_budget_gb": 1.0, "memory_policy_hardware": "a100"},
         r"memory_policy_hardware='a100' is not accepted; use one of 'device', 'cpu', 'h100', 'h200'"),
    ],
)
def test_memory_budget_options_name_field_value_and_fix(options, pattern):
    with pytest.raises(MoPConfigError, match=pattern):
        MoPConfig.from_options(options)
    assert MoPConfig.from_options({"offload": "auto", "memory_budget_gb": 40}).memory_budget_gb == 40
