// TensorRT IPluginV3 wrapper of the rotary kernel (plugin QmoeRotary, see runtime/contract.py).
#pragma once

#include "pluginUtils.h"

namespace qmoe::trt
{

using rotary_contract = qmoe::contract::QmoeRotary;

class RotaryPlugin final : public ContractPlugin<RotaryPlugin, rotary_contract>
{
public:
    using ContractPlugin::ContractPlugin;

    // Fields checked once, at creation: ranges the kernels accept.
    static bool validFields(Fields const& f);

    // Input shapes against the fields; unknown dims (-1, build time) are not compared.
    bool shapesValid(nvinfer1::Dims const* inputDims, int32_t nbInputs) const;

    // IPluginV3OneBuild
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;

    // IPluginV3OneRuntime
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
};

using RotaryCreator = ContractCreator<RotaryPlugin, rotary_contract>;

} // namespace qmoe::trt
