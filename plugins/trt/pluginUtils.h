// Helpers shared by the qmoe TensorRT plugins: contract field lookup, int32 plugin fields, dtypes, dims.
#pragma once

#include "qmoeContract.h"

#include <NvInferRuntime.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <new>

namespace qmoe::trt
{

constexpr bool strEqual(char const* a, char const* b)
{
    while (*a != '\0' && *a == *b)
    {
        ++a;
        ++b;
    }
    return *a == *b;
}

// Index of `name` in a contract field list, -1 if absent: the plugins name their fields through this,
// so a renamed or reordered field in runtime/contract.py fails to compile instead of misreading data.
template <std::size_t N>
constexpr int fieldIndex(char const* const (&names)[N], char const* name)
{
    for (std::size_t i = 0; i < N; ++i)
    {
        if (strEqual(names[i], name))
        {
            return static_cast<int>(i);
        }
    }
    return -1;
}

// One line on stderr (the plugin library has no TensorRT logger of its own).
void logPluginError(char const* plugin, char const* what, char const* detail = "");

// N int32 plugin fields with the contract's names, in the contract's order. Owns the values and the
// PluginField array that getFieldNames / getFieldsToSerialize hand to TensorRT.
template <int N>
class IntFields
{
public:
    explicit IntFields(char const* const (&names)[N])
        : mNames(names)
    {
        mValues.fill(0);
        refresh();
    }
    IntFields(IntFields const& other)
        : mNames(other.mNames)
        , mValues(other.mValues)
    {
        refresh();
    }
    IntFields& operator=(IntFields const&) = delete;

    int32_t operator[](int i) const
    {
        return mValues[i];
    }
    int32_t& operator[](int i)
    {
        return mValues[i];
    }

    // Fills the values from `fc` (build: the ONNX node attributes; runtime: getFieldsToSerialize).
    // Every field must be present exactly as int32 with length 1; returns false and logs otherwise.
    bool read(nvinfer1::PluginFieldCollection const* fc, char const* plugin)
    {
        std::array<bool, N> seen{};
        for (int32_t f = 0; fc != nullptr && f < fc->nbFields; ++f)
        {
            nvinfer1::PluginField const& field = fc->fields[f];
            for (int i = 0; i < N; ++i)
            {
                if (field.name != nullptr && strEqual(field.name, mNames[i]))
                {
                    if (field.type != nvinfer1::PluginFieldType::kINT32 || field.length != 1 || field.data == nullptr)
                    {
                        logPluginError(plugin, "field must be one int32:", mNames[i]);
                        return false;
                    }
                    mValues[i] = *static_cast<int32_t const*>(field.data);
                    seen[i] = true;
                }
            }
        }
        for (int i = 0; i < N; ++i)
        {
            if (!seen[i])
            {
                logPluginError(plugin, "missing field", mNames[i]);
                return false;
            }
        }
        return true;
    }

    nvinfer1::PluginFieldCollection const* collection() const
    {
        return &mCollection;
    }

private:
    void refresh()
    {
        for (int i = 0; i < N; ++i)
        {
            mFields[i] = nvinfer1::PluginField(mNames[i], &mValues[i], nvinfer1::PluginFieldType::kINT32, 1);
        }
        mCollection.nbFields = N;
        mCollection.fields = mFields.data();
    }

    char const* const (&mNames)[N];
    std::array<int32_t, N> mValues;
    std::array<nvinfer1::PluginField, N> mFields;
    nvinfer1::PluginFieldCollection mCollection;
};

// Field descriptions for IPluginCreatorV3One::getFieldNames (names and types, no data).
template <int N>
class FieldNames
{
public:
    explicit FieldNames(char const* const (&names)[N])
    {
        for (int i = 0; i < N; ++i)
        {
            mFields[i] = nvinfer1::PluginField(names[i], nullptr, nvinfer1::PluginFieldType::kINT32, 1);
        }
        mCollection.nbFields = N;
        mCollection.fields = mFields.data();
    }
    nvinfer1::PluginFieldCollection const* collection() const
    {
        return &mCollection;
    }

private:
    std::array<nvinfer1::PluginField, N> mFields;
    nvinfer1::PluginFieldCollection mCollection;
};

// The IPluginV3 part every qmoe plugin shares: capability interfaces, clone, identity (name, version,
// namespace) from its contract struct (qmoeContract.h) and the int32 fields kept for serialisation.
// Shape checks at configure time and on every shape change go to Derived::shapesValid. Derived (CRTP)
// adds the other build and runtime methods and `static bool validFields(Fields const&)`.
template <typename Derived, typename Contract>
class ContractPlugin : public nvinfer1::IPluginV3,
                       public nvinfer1::IPluginV3OneCore,
                       public nvinfer1::IPluginV3OneBuild,
                       public nvinfer1::IPluginV3OneRuntime
{
public:
    using Fields = IntFields<Contract::kNumFields>;

    explicit ContractPlugin(Fields const& fields)
        : mFields(fields)
    {
    }

    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override
    {
        switch (type)
        {
        case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
        case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
        case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
        }
        return nullptr;
    }

    nvinfer1::IPluginV3* clone() noexcept override
    {
        return new (std::nothrow) Derived(static_cast<Derived const&>(*this));
    }

    char const* getPluginName() const noexcept override
    {
        return Contract::kName;
    }

    char const* getPluginVersion() const noexcept override
    {
        return Contract::kVersion;
    }

    char const* getPluginNamespace() const noexcept override
    {
        return contract::kPluginNamespace;
    }

    int32_t getNbOutputs() const noexcept override
    {
        return Contract::kNumOutputs;
    }

    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept override
    {
        return checkShapes(nbInputs, nbOutputs, [&](int32_t i) { return in[i].desc.dims; });
    }

    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::PluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept override
    {
        return checkShapes(nbInputs, nbOutputs, [&](int32_t i) { return in[i].dims; });
    }

    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* /*context*/) noexcept override
    {
        return clone();
    }

    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override
    {
        return mFields.collection();
    }

protected:
    Fields mFields;

private:
    template <typename DimsOf>
    int32_t checkShapes(int32_t nbInputs, int32_t nbOutputs, DimsOf dimsOf) const
    {
        if (nbInputs != Contract::kNumInputs || nbOutputs != Contract::kNumOutputs)
        {
            return -1;
        }
        nvinfer1::Dims dims[Contract::kNumInputs];
        for (int32_t i = 0; i < nbInputs; ++i)
        {
            dims[i] = dimsOf(i);
        }
        return static_cast<Derived const*>(this)->shapesValid(dims, nbInputs) ? 0 : -1;
    }
};

// The IPluginCreatorV3One of Plugin: its fields are read by the contract's names and checked by
// Plugin::validFields; anything off gives nullptr and one line on stderr.
template <typename Plugin, typename Contract>
class ContractCreator final : public nvinfer1::IPluginCreatorV3One
{
public:
    ContractCreator()
        : mFieldNames(Contract::kFieldNames)
    {
    }

    nvinfer1::IPluginV3* createPlugin(char const* /*name*/, nvinfer1::PluginFieldCollection const* fc,
        nvinfer1::TensorRTPhase /*phase*/) noexcept override
    {
        typename Plugin::Fields fields(Contract::kFieldNames);
        if (!fields.read(fc, Contract::kName) || !Plugin::validFields(fields))
        {
            return nullptr;
        }
        return new (std::nothrow) Plugin(fields);
    }

    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override
    {
        return mFieldNames.collection();
    }

    char const* getPluginName() const noexcept override
    {
        return Contract::kName;
    }

    char const* getPluginVersion() const noexcept override
    {
        return Contract::kVersion;
    }

    char const* getPluginNamespace() const noexcept override
    {
        return contract::kPluginNamespace;
    }

private:
    FieldNames<Contract::kNumFields> mFieldNames;
};

// qmoe_dtype of a TensorRT type, -1 if the kernels do not take it.
int32_t kernelDtype(nvinfer1::DataType t);

// Product of d[from..to) (to < 0: up to nbDims + to); -1 if any of them is unknown.
int64_t dimsVolume(nvinfer1::Dims const& d, int from, int to);

// True if d has exactly expect.size() dims and each known dim (>= 0) equals the expected value where
// that value is known (>= 0).
bool dimsMatch(nvinfer1::Dims const& d, std::initializer_list<int64_t> expect);

} // namespace qmoe::trt
