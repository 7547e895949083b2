// Entry points of libqmoe_trt_plugins.so, the two that TensorRT's documentation asks a dynamically
// loaded plugin library to expose (trtexec's README, "Using your own Plugin"):
// IPluginRegistry::loadLibrary (trtexec --dynamicPlugins, the ONNX parser's plugin lookup) calls
// getCreators, and setLoggerFinder hands over TensorRT's logger. Everything else is hidden by
// exports.map.
#include "rotaryPlugin.h"
#include "routedExpertsPlugin.h"

#include <atomic>

namespace
{
// TensorRT's logger finder; the plugins report errors through status codes and do not log yet.
std::atomic<nvinfer1::ILoggerFinder*> gLoggerFinder{nullptr};
} // namespace

extern "C" __attribute__((visibility("default"))) void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    gLoggerFinder.store(finder, std::memory_order_relaxed);
}

extern "C" __attribute__((visibility("default"))) nvinfer1::IPluginCreatorInterface* const* getCreators(
    int32_t& nbCreators)
{
    static qmoe::trt::RoutedExpertsCreator routedExperts;
    static qmoe::trt::RotaryCreator rotary;
    static nvinfer1::IPluginCreatorInterface* const creators[] = {&routedExperts, &rotary};
    nbCreators = static_cast<int32_t>(sizeof(creators) / sizeof(creators[0]));
    return creators;
}
