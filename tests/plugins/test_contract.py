"""plugins/trt follows runtime/contract.py: the committed header is the generated one, and the plugin
sources take names, versions, fields and tensor positions from it instead of restating them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from runtime import contract

TRT_DIR = Path(__file__).resolve().parents[2] / "plugins" / "trt"
SOURCES = {
    contract.ROUTED_EXPERTS.name: (TRT_DIR / "routedExpertsPlugin.cpp", "moe_contract", "RoutedExperts"),
    contract.ROTARY.name: (TRT_DIR / "rotaryPlugin.cpp", "rotary_contract", "Rotary"),
}


def test_committed_header_is_generated() -> None:
    committed = (TRT_DIR / "qmoeContract.h").read_text()
    assert committed == contract.header(), "regenerate: python -m runtime.contract --header > plugins/trt/qmoeContract.h"


def test_every_plugin_has_a_source() -> None:
    assert set(SOURCES) == {spec.name for spec in contract.PLUGINS}


@pytest.mark.parametrize("spec", contract.PLUGINS, ids=lambda s: s.name)
def test_plugin_source_uses_contract(spec: contract.PluginSpec) -> None:
    path, alias, cls = SOURCES[spec.name]
    cpp = path.read_text()
    header = (TRT_DIR / path.name.replace(".cpp", ".h")).read_text()
    ns = f"qmoe::contract::{spec.name}"
    assert f"using {alias} = {ns};" in header
    # Identity, fields, clone and the creator come from the shared templates, bound to this contract.
    assert f"class {cls}Plugin final : public ContractPlugin<{cls}Plugin, {alias}>" in header
    assert f"using {cls}Creator = ContractCreator<{cls}Plugin, {alias}>;" in header
    # Every field is looked up by name in the contract's list (a rename fails to compile).
    looked_up = re.findall(rf'fieldIndex\({alias}::kFieldNames, "(\w+)"\)', cpp)
    assert sorted(looked_up) == sorted(f.name for f in spec.fields)
    # IntFields reads and writes kINT32 only.
    assert {f.type for f in spec.fields} == {"int32"}

    # Tensors by contract position, never by a bare index.
    for t in spec.inputs:
        assert f"{alias}::kInput_{t.name}" in cpp, f"input {t.name} unused"
    for t in spec.outputs:
        assert f"{alias}::kOutput_{t.name}" in cpp, f"output {t.name} unused"
    assert re.search(r"inputs\[\d", cpp) is None and re.search(r"outputs\[\d", cpp) is None
    assert f"{alias}::kNumInputs == {len(spec.inputs)}" in cpp
    assert f"{alias}::kNumOutputs == {len(spec.outputs)}" in cpp

    # Name, version and namespace come from the header, not from string literals.
    for literal in (spec.name, contract.PLUGIN_NAMESPACE):
        assert f'"{literal}"' not in cpp and f'"{literal}"' not in header


def test_shared_plugin_templates_take_everything_from_the_contract() -> None:
    utils = (TRT_DIR / "pluginUtils.h").read_text()
    # The creator's getFieldNames and the plugin's serialised fields are built from kFieldNames.
    assert "mFieldNames(Contract::kFieldNames)" in utils
    assert "typename Plugin::Fields fields(Contract::kFieldNames);" in utils
    assert "using Fields = IntFields<Contract::kNumFields>;" in utils
    assert utils.count("return Contract::kName;") == 2 and utils.count("return Contract::kVersion;") == 2
    assert utils.count("return contract::kPluginNamespace;") == 2
    assert '"' + contract.PLUGIN_NAMESPACE + '"' not in utils


def test_no_plugin_is_named_like_a_builtin_op() -> None:
    # The ONNX parser tries built-in importers first (FACTS.md): such a name would never reach us.
    builtin = {"MoE", "Attention", "RotaryEmbedding", "GroupQueryAttention"}
    assert not builtin & {spec.name for spec in contract.PLUGINS}
