#include "routedExpertsPlugin.h"

#include "qmoe_kernels.h"

#include <new>

namespace qmoe::trt
{
namespace
{

using nvinfer1::DataType;
using nvinfer1::Dims;
using nvinfer1::DynamicPluginTensorDesc;
using nvinfer1::PluginTensorDesc;

constexpr int kNumExperts = fieldIndex(moe_contract::kFieldNames, "num_experts");
constexpr int kTopK = fieldIndex(moe_contract::kFieldNames, "top_k");
constexpr int kNormTopk = fieldIndex(moe_contract::kFieldNames, "norm_topk_prob");
constexpr int kInter = fieldIndex(moe_contract::kFieldNames, "moe_intermediate_size");
constexpr int kSharedInter = fieldIndex(moe_contract::kFieldNames, "shared_intermediate_size");
constexpr int kGateUpBlock = fieldIndex(moe_contract::kFieldNames, "gate_up_block");
static_assert(kNumExperts >= 0 && kTopK >= 0 && kNormTopk >= 0 && kInter >= 0 && kSharedInter >= 0 && kGateUpBlock >= 0,
    "runtime/contract.py renamed a QmoeRoutedExperts field: update this plugin");
static_assert(moe_contract::kNumInputs == 7 && moe_contract::kNumOutputs == 1,
    "runtime/contract.py changed the QmoeRoutedExperts inputs: update this plugin");

constexpr size_t kWorkspaceAlign = 256; // the kernels want a 256-byte aligned workspace

char const* const kName = moe_contract::kName;

} // namespace

bool RoutedExpertsPlugin::validFields(Fields const& f)
{
    int32_t const e = f[kNumExperts];
    int32_t const k = f[kTopK];
    int32_t const b = f[kGateUpBlock];
    bool const ok = e >= 1 && e <= 256 && k >= 1 && k <= 32 && k <= e && (f[kNormTopk] == 0 || f[kNormTopk] == 1)
        && f[kInter] > 0 && f[kInter] % 8 == 0 && f[kSharedInter] >= 0 && f[kSharedInter] % 8 == 0
        && (b == 0 || (b > 0 && b % 8 == 0 && f[kInter] % b == 0 && f[kSharedInter] % b == 0));
    if (!ok)
    {
        logPluginError(kName,
            "fields out of range: need 1 <= num_experts <= 256, 1 <= top_k <= min(num_experts, 32), norm_topk_prob in "
            "{0, 1}, moe_intermediate_size > 0 and shared_intermediate_size >= 0, both multiples of 8, gate_up_block "
            "0 or a multiple of 8 dividing both");
    }
    return ok;
}

bool RoutedExpertsPlugin::shapesValid(Dims const* d, int32_t nbInputs) const
{
    if (nbInputs != moe_contract::kNumInputs || d[moe_contract::kInput_hidden].nbDims < 2)
    {
        return false;
    }
    Dims const& hidden = d[moe_contract::kInput_hidden];
    int64_t const h = hidden.d[hidden.nbDims - 1];
    int64_t const e = mFields[kNumExperts];
    int64_t const i = mFields[kInter];
    int64_t const is = mFields[kSharedInter];
    bool ok = (h < 0 || h % 8 == 0) && dimsMatch(d[moe_contract::kInput_router_weight], {e, h})
        && dimsMatch(d[moe_contract::kInput_gate_up_weight], {e, 2 * i, h})
        && dimsMatch(d[moe_contract::kInput_down_weight], {e, h, i});
    if (ok && is > 0)
    {
        ok = dimsMatch(d[moe_contract::kInput_shared_gate_up_weight], {2 * is, h})
            && dimsMatch(d[moe_contract::kInput_shared_down_weight], {h, is})
            && dimsMatch(d[moe_contract::kInput_shared_expert_gate_weight], {1, h});
    }
    if (!ok)
    {
        logPluginError(kName, "input shapes do not match the contract",
            "(hidden [T, H], router [E, H], gate_up [E, 2I, H], down [E, H, I], shared [2Is, H], [H, Is], [1, H]; "
            "H a multiple of 8)");
    }
    return ok;
}

int32_t RoutedExpertsPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (nbInputs != moe_contract::kNumInputs || nbOutputs != moe_contract::kNumOutputs)
    {
        return -1;
    }
    outputTypes[moe_contract::kOutput_output] = inputTypes[moe_contract::kInput_hidden];
    return 0;
}

int32_t RoutedExpertsPlugin::getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
    nvinfer1::DimsExprs const* shapeInputs, int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
    nvinfer1::IExprBuilder& exprBuilder) noexcept
{
    if (nbInputs != moe_contract::kNumInputs || nbOutputs != moe_contract::kNumOutputs)
    {
        return -1;
    }
    outputs[moe_contract::kOutput_output] = inputs[moe_contract::kInput_hidden];
    return 0;
}

bool RoutedExpertsPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    PluginTensorDesc const& d = inOut[pos].desc;
    if (d.format != nvinfer1::TensorFormat::kLINEAR)
    {
        return false;
    }
    if (pos == moe_contract::kInput_hidden)
    {
        return d.type == DataType::kHALF || d.type == DataType::kBF16;
    }
    return d.type == inOut[moe_contract::kInput_hidden].desc.type; // every tensor shares the activation dtype
}

size_t RoutedExpertsPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
    DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept
{
    if (nbInputs != moe_contract::kNumInputs)
    {
        return 0;
    }
    Dims const& maxHidden = inputs[moe_contract::kInput_hidden].max;
    qmoe_moe_params p{};
    p.num_tokens = static_cast<int32_t>(dimsVolume(maxHidden, 0, -1));
    p.hidden_size = maxHidden.d[maxHidden.nbDims - 1];
    p.num_experts = mFields[kNumExperts];
    p.top_k = mFields[kTopK];
    p.moe_intermediate_size = mFields[kInter];
    p.shared_intermediate_size = mFields[kSharedInter];
    size_t const bytes = qmoe_moe_workspace_size(&p);
    return bytes == 0 ? 0 : bytes + kWorkspaceAlign;
}

int32_t RoutedExpertsPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    Dims const& hidden = inputDesc[moe_contract::kInput_hidden].dims;
    int64_t const tokens = dimsVolume(hidden, 0, -1);
    int32_t const dtype = kernelDtype(inputDesc[moe_contract::kInput_hidden].type);
    if (tokens < 0 || tokens > INT32_MAX || (dtype != QMOE_DTYPE_FP16 && dtype != QMOE_DTYPE_BF16))
    {
        logPluginError(kName, "enqueue: unsupported token count or dtype");
        return QMOE_ERR_BAD_SHAPE;
    }
    qmoe_moe_params p{};
    p.num_tokens = static_cast<int32_t>(tokens);
    p.hidden_size = hidden.d[hidden.nbDims - 1];
    p.num_experts = mFields[kNumExperts];
    p.top_k = mFields[kTopK];
    p.norm_topk_prob = mFields[kNormTopk];
    p.moe_intermediate_size = mFields[kInter];
    p.shared_intermediate_size = mFields[kSharedInter];
    p.gate_up_block = mFields[kGateUpBlock];
    p.dtype = dtype;
    p.path = QMOE_PATH_AUTO;
    p.hidden = inputs[moe_contract::kInput_hidden];
    p.router_weight = inputs[moe_contract::kInput_router_weight];
    p.gate_up_weight = inputs[moe_contract::kInput_gate_up_weight];
    p.down_weight = inputs[moe_contract::kInput_down_weight];
    p.shared_gate_up_weight = inputs[moe_contract::kInput_shared_gate_up_weight];
    p.shared_down_weight = inputs[moe_contract::kInput_shared_down_weight];
    p.shared_expert_gate_weight = inputs[moe_contract::kInput_shared_expert_gate_weight];
    p.output = outputs[moe_contract::kOutput_output];
    // getWorkspaceSize reserved kWorkspaceAlign extra bytes for this round-up; the size is the one the
    // kernels need for these shapes, which the reservation for the profile's max shapes covers.
    uintptr_t const raw = reinterpret_cast<uintptr_t>(workspace);
    p.workspace = reinterpret_cast<void*>((raw + kWorkspaceAlign - 1) / kWorkspaceAlign * kWorkspaceAlign);
    p.workspace_size = qmoe_moe_workspace_size(&p);
    int32_t const status = qmoe_moe_forward(&p, stream);
    if (status != QMOE_OK)
    {
        logPluginError(kName, "enqueue failed:", qmoe_status_string(status));
    }
    return status;
}

} // namespace qmoe::trt
