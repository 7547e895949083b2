#include "pluginUtils.h"

#include "qmoe_kernels.h"

#include <cstdio>

namespace qmoe::trt
{

void logPluginError(char const* plugin, char const* what, char const* detail)
{
    std::fprintf(stderr, "[qmoe] %s: %s %s\n", plugin, what, detail);
}

int32_t kernelDtype(nvinfer1::DataType t)
{
    switch (t)
    {
    case nvinfer1::DataType::kHALF: return QMOE_DTYPE_FP16;
    case nvinfer1::DataType::kBF16: return QMOE_DTYPE_BF16;
    case nvinfer1::DataType::kFLOAT: return QMOE_DTYPE_FP32;
    default: return -1;
    }
}

int64_t dimsVolume(nvinfer1::Dims const& d, int from, int to)
{
    int const end = to < 0 ? d.nbDims + to : to;
    int64_t v = 1;
    for (int i = from; i < end; ++i)
    {
        if (d.d[i] < 0)
        {
            return -1;
        }
        v *= d.d[i];
    }
    return v;
}

bool dimsMatch(nvinfer1::Dims const& d, std::initializer_list<int64_t> expect)
{
    if (d.nbDims != static_cast<int32_t>(expect.size()))
    {
        return false;
    }
    int i = 0;
    for (int64_t e : expect)
    {
        if (e >= 0 && d.d[i] >= 0 && d.d[i] != e)
        {
            return false;
        }
        ++i;
    }
    return true;
}

} // namespace qmoe::trt
