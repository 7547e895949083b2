#include "rotaryPlugin.h"

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

constexpr int kNumHeads = fieldIndex(rotary_contract::kFieldNames, "num_heads");
constexpr int kNumKvHeads = fieldIndex(rotary_contract::kFieldNames, "num_kv_heads");
constexpr int kHeadDim = fieldIndex(rotary_contract::kFieldNames, "head_dim");
static_assert(kNumHeads >= 0 && kNumKvHeads >= 0 && kHeadDim >= 0,
    "runtime/contract.py renamed a QmoeRotary field: update this plugin");
static_assert(rotary_contract::kNumInputs == 5 && rotary_contract::kNumOutputs == 2,
    "runtime/contract.py changed the QmoeRotary inputs: update this plugin");

char const* const kName = rotary_contract::kName;

} // namespace

bool RotaryPlugin::validFields(Fields const& f)
{
    bool const ok = f[kNumHeads] >= 1 && f[kNumKvHeads] >= 1 && f[kNumKvHeads] <= f[kNumHeads]
        && f[kNumHeads] % f[kNumKvHeads] == 0 && f[kHeadDim] >= 2 && f[kHeadDim] % 2 == 0;
    if (!ok)
    {
        logPluginError(kName, "fields out of range: need num_heads a multiple of num_kv_heads >= 1, head_dim even");
    }
    return ok;
}

bool RotaryPlugin::shapesValid(Dims const* d, int32_t nbInputs) const
{
    if (nbInputs != rotary_contract::kNumInputs)
    {
        return false;
    }
    Dims const& q = d[rotary_contract::kInput_query];
    int64_t const b = q.nbDims == 3 ? q.d[0] : -1;
    int64_t const s = q.nbDims == 3 ? q.d[1] : -1;
    int64_t const dim = mFields[kHeadDim];
    int64_t const p = d[rotary_contract::kInput_cos].nbDims == 2 ? d[rotary_contract::kInput_cos].d[0] : -1;
    bool const ok = dimsMatch(q, {b, s, mFields[kNumHeads] * dim})
        && dimsMatch(d[rotary_contract::kInput_key], {b, s, mFields[kNumKvHeads] * dim})
        && dimsMatch(d[rotary_contract::kInput_cos], {p, dim / 2})
        && dimsMatch(d[rotary_contract::kInput_sin], {p, dim / 2})
        && dimsMatch(d[rotary_contract::kInput_position_ids], {b, s}) && p != 0;
    if (!ok)
    {
        logPluginError(kName, "input shapes do not match the contract",
            "(query [B, S, Hq*D], key [B, S, Hkv*D], cos/sin [P, D/2] with P >= 1, position_ids [B, S])");
    }
    return ok;
}

int32_t RotaryPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (nbInputs != rotary_contract::kNumInputs || nbOutputs != rotary_contract::kNumOutputs)
    {
        return -1;
    }
    outputTypes[rotary_contract::kOutput_query_out] = inputTypes[rotary_contract::kInput_query];
    outputTypes[rotary_contract::kOutput_key_out] = inputTypes[rotary_contract::kInput_key];
    return 0;
}

int32_t RotaryPlugin::getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
    nvinfer1::DimsExprs const* shapeInputs, int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
    nvinfer1::IExprBuilder& exprBuilder) noexcept
{
    if (nbInputs != rotary_contract::kNumInputs || nbOutputs != rotary_contract::kNumOutputs)
    {
        return -1;
    }
    outputs[rotary_contract::kOutput_query_out] = inputs[rotary_contract::kInput_query];
    outputs[rotary_contract::kOutput_key_out] = inputs[rotary_contract::kInput_key];
    return 0;
}

bool RotaryPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    PluginTensorDesc const& d = inOut[pos].desc;
    if (d.format != nvinfer1::TensorFormat::kLINEAR)
    {
        return false;
    }
    DataType const act = inOut[rotary_contract::kInput_query].desc.type;
    switch (pos)
    {
    case rotary_contract::kInput_query:
        return d.type == DataType::kFLOAT || d.type == DataType::kHALF || d.type == DataType::kBF16;
    case rotary_contract::kInput_cos:
    case rotary_contract::kInput_sin: return d.type == DataType::kFLOAT;
    case rotary_contract::kInput_position_ids: return d.type == DataType::kINT64;
    default: return d.type == act; // key and both outputs
    }
}

size_t RotaryPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
    DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept
{
    return 0;
}

int32_t RotaryPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    Dims const& q = inputDesc[rotary_contract::kInput_query].dims;
    qmoe_rotary_params p{};
    p.batch = q.d[0];
    p.seq_len = q.d[1];
    p.num_heads = mFields[kNumHeads];
    p.num_kv_heads = mFields[kNumKvHeads];
    p.head_dim = mFields[kHeadDim];
    p.num_positions = inputDesc[rotary_contract::kInput_cos].dims.d[0];
    p.dtype = kernelDtype(inputDesc[rotary_contract::kInput_query].type);
    p.query = inputs[rotary_contract::kInput_query];
    p.key = inputs[rotary_contract::kInput_key];
    p.cos = static_cast<float const*>(inputs[rotary_contract::kInput_cos]);
    p.sin = static_cast<float const*>(inputs[rotary_contract::kInput_sin]);
    p.position_ids = static_cast<int64_t const*>(inputs[rotary_contract::kInput_position_ids]);
    p.query_out = outputs[rotary_contract::kOutput_query_out];
    p.key_out = outputs[rotary_contract::kOutput_key_out];
    int32_t const status = qmoe_rotary_forward(&p, stream);
    if (status != QMOE_OK)
    {
        logPluginError(kName, "enqueue failed:", qmoe_status_string(status));
    }
    return status;
}

} // namespace qmoe::trt
