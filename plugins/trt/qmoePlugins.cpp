// Entry point of libqmoe_trt_plugins.so: TensorRT's IPluginRegistry::loadLibrary (trtexec
// --dynamicPlugins, the ONNX parser's plugin lookup) calls getCreators. Everything else is hidden by
// exports.map.
#include "rotaryPlugin.h"
#include "routedExpertsPlugin.h"

extern "C" __attribute__((visibility("default"))) nvinfer1::IPluginCreatorInterface* const* getCreators(
    int32_t& nbCreators)
{
    static qmoe::trt::RoutedExpertsCreator routedExperts;
    static qmoe::trt::RotaryCreator rotary;
    static nvinfer1::IPluginCreatorInterface* const creators[] = {&routedExperts, &rotary};
    nbCreators = static_cast<int32_t>(sizeof(creators) / sizeof(creators[0]));
    return creators;
}
