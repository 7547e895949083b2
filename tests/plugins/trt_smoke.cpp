// CPU smoke test of libqmoe_trt_plugins.so through TensorRT's public interfaces only (no libnvinfer,
// no GPU): dlopen, getCreators, create plugins from fields, serialise and re-create, query build-time
// methods. Prints one JSON object per creator; tests/plugins/test_build.py checks it against
// runtime/contract.py. Exit code != 0 on the first failed expectation.
//
// usage: trt_smoke <libqmoe_trt_plugins.so>
#include <NvInferRuntime.h>

#include <dlfcn.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace
{

int gFailures = 0;

void expect(bool ok, char const* what)
{
    if (!ok)
    {
        std::fprintf(stderr, "trt_smoke: FAILED %s\n", what);
        ++gFailures;
    }
}

Dims dims(std::vector<int64_t> const& v)
{
    Dims d{};
    d.nbDims = static_cast<int32_t>(v.size());
    for (size_t i = 0; i < v.size(); ++i)
    {
        d.d[i] = v[i];
    }
    return d;
}

DynamicPluginTensorDesc desc(std::vector<int64_t> const& v, DataType t)
{
    DynamicPluginTensorDesc d{};
    d.desc.dims = dims(v);
    d.desc.type = t;
    d.desc.format = TensorFormat::kLINEAR;
    d.min = d.desc.dims;
    d.max = d.desc.dims;
    d.opt = d.desc.dims;
    return d;
}

// Field values by name for createPlugin; every field of the creator gets a value.
PluginFieldCollection fieldsFor(IPluginCreatorV3One* c, std::vector<PluginField>& storage,
    std::vector<int32_t>& values, int skip = -1)
{
    PluginFieldCollection const* names = c->getFieldNames();
    storage.clear();
    for (int32_t i = 0; i < names->nbFields; ++i)
    {
        if (i != skip)
        {
            storage.emplace_back(names->fields[i].name, &values[i], PluginFieldType::kINT32, 1);
        }
    }
    return PluginFieldCollection{static_cast<int32_t>(storage.size()), storage.data()};
}

// Build-time and serialisation checks common to both plugins; returns the plugin (caller deletes).
IPluginV3* exercise(IPluginCreatorV3One* c, std::vector<int32_t> values, std::vector<DynamicPluginTensorDesc> in,
    std::vector<DynamicPluginTensorDesc> out, std::vector<DynamicPluginTensorDesc> badIn)
{
    std::vector<PluginField> storage;
    PluginFieldCollection fc = fieldsFor(c, storage, values);
    IPluginV3* p = c->createPlugin("smoke", &fc, TensorRTPhase::kBUILD);
    expect(p != nullptr, "createPlugin(kBUILD)");
    if (p == nullptr)
    {
        return nullptr;
    }
    auto* core = static_cast<IPluginV3OneCore*>(p->getCapabilityInterface(PluginCapabilityType::kCORE));
    auto* build = static_cast<IPluginV3OneBuild*>(p->getCapabilityInterface(PluginCapabilityType::kBUILD));
    auto* run = static_cast<IPluginV3OneRuntime*>(p->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    expect(core && build && run, "capability interfaces");
    expect(std::strcmp(core->getPluginName(), c->getPluginName()) == 0, "plugin name == creator name");
    expect(std::strcmp(core->getPluginVersion(), c->getPluginVersion()) == 0, "plugin version == creator version");
    expect(std::strcmp(core->getPluginNamespace(), c->getPluginNamespace()) == 0, "namespace");
    expect(std::strcmp(core->getInterfaceInfo().kind, "PLUGIN_V3ONE_CORE") == 0, "core interface kind");
    expect(build->getNbOutputs() == static_cast<int32_t>(out.size()), "getNbOutputs");

    int32_t const nIn = static_cast<int32_t>(in.size());
    int32_t const nOut = static_cast<int32_t>(out.size());
    expect(build->configurePlugin(in.data(), nIn, out.data(), nOut) == 0, "configurePlugin(valid shapes)");
    expect(build->configurePlugin(badIn.data(), nIn, out.data(), nOut) != 0, "configurePlugin(bad shapes) fails");

    std::vector<DataType> inTypes;
    for (auto const& d : in)
    {
        inTypes.push_back(d.desc.type);
    }
    std::vector<DataType> outTypes(out.size(), DataType::kINT8);
    expect(build->getOutputDataTypes(outTypes.data(), nOut, inTypes.data(), nIn) == 0, "getOutputDataTypes");
    for (int32_t i = 0; i < nOut; ++i)
    {
        expect(outTypes[i] == out[i].desc.type, "output dtype follows the activation dtype");
    }
    std::vector<DynamicPluginTensorDesc> io(in);
    io.insert(io.end(), out.begin(), out.end());
    for (int32_t pos = 0; pos < nIn + nOut; ++pos)
    {
        expect(build->supportsFormatCombination(pos, io.data(), nIn, nOut), "supportsFormatCombination(valid)");
    }
    io[0].desc.type = DataType::kINT8;
    expect(!build->supportsFormatCombination(0, io.data(), nIn, nOut), "supportsFormatCombination rejects int8");

    // Serialise -> create at runtime -> same fields.
    PluginFieldCollection const* ser = run->getFieldsToSerialize();
    expect(ser != nullptr && ser->nbFields == static_cast<int32_t>(values.size()), "getFieldsToSerialize count");
    IPluginV3* again = c->createPlugin("smoke", ser, TensorRTPhase::kRUNTIME);
    expect(again != nullptr, "createPlugin(kRUNTIME) from serialised fields");
    if (again != nullptr)
    {
        auto* run2 = static_cast<IPluginV3OneRuntime*>(again->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
        PluginFieldCollection const* ser2 = run2->getFieldsToSerialize();
        for (int32_t i = 0; i < ser->nbFields && i < ser2->nbFields; ++i)
        {
            expect(std::strcmp(ser->fields[i].name, ser2->fields[i].name) == 0
                    && *static_cast<int32_t const*>(ser->fields[i].data)
                        == *static_cast<int32_t const*>(ser2->fields[i].data),
                "serialised fields round-trip");
        }
        delete again;
    }
    IPluginV3* copy = p->clone();
    expect(copy != nullptr, "clone");
    if (copy != nullptr)
    {
        auto* runCopy = static_cast<IPluginV3OneRuntime*>(copy->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
        PluginFieldCollection const* serCopy = runCopy->getFieldsToSerialize();
        expect(serCopy->fields != ser->fields, "clone owns its fields");
        delete copy;
    }

    // A missing field is refused.
    std::vector<PluginField> partial;
    PluginFieldCollection missing = fieldsFor(c, partial, values, 0);
    IPluginV3* none = c->createPlugin("smoke", &missing, TensorRTPhase::kBUILD);
    expect(none == nullptr, "createPlugin refuses a missing field");
    delete none;
    return p;
}

void printCreator(IPluginCreatorV3One* c, size_t workspace)
{
    PluginFieldCollection const* f = c->getFieldNames();
    std::string names;
    std::string types;
    for (int32_t i = 0; i < f->nbFields; ++i)
    {
        names += std::string(i ? ", " : "") + "\"" + f->fields[i].name + "\"";
        types += std::string(i ? ", " : "") + std::to_string(static_cast<int>(f->fields[i].type));
    }
    std::printf("{\"name\": \"%s\", \"version\": \"%s\", \"namespace\": \"%s\", \"interface\": \"%s\", "
                "\"fields\": [%s], \"field_types\": [%s], \"workspace\": %zu}\n",
        c->getPluginName(), c->getPluginVersion(), c->getPluginNamespace(), c->getInterfaceInfo().kind,
        names.c_str(), types.c_str(), workspace);
}

} // namespace

int main(int argc, char** argv)
{
    if (argc != 2)
    {
        std::fprintf(stderr, "usage: trt_smoke <libqmoe_trt_plugins.so>\n");
        return 2;
    }
    void* lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr)
    {
        std::fprintf(stderr, "trt_smoke: %s\n", dlerror());
        return 2;
    }
    using GetCreators = IPluginCreatorInterface* const* (*) (int32_t&);
    auto getCreators = reinterpret_cast<GetCreators>(dlsym(lib, "getCreators"));
    expect(getCreators != nullptr, "getCreators exported");
    if (getCreators == nullptr)
    {
        return 1;
    }
    int32_t n = 0;
    IPluginCreatorInterface* const* creators = getCreators(n);
    expect(n == 2, "two creators");
    for (int32_t i = 0; i < n; ++i)
    {
        auto* c = static_cast<IPluginCreatorV3One*>(creators[i]);
        std::string const name = c->getPluginName();
        size_t workspace = 0;
        IPluginV3* p = nullptr;
        if (name == "QmoeRoutedExperts")
        {
            // E=4, k=2, norm=1, I=16, Is=32, gate_up_block=8, H=24, T=5 (fields in contract order)
            DataType const t = DataType::kBF16;
            std::vector<DynamicPluginTensorDesc> in{desc({5, 24}, t), desc({4, 24}, t), desc({4, 32, 24}, t),
                desc({4, 24, 16}, t), desc({64, 24}, t), desc({24, 32}, t), desc({1, 24}, t)};
            std::vector<DynamicPluginTensorDesc> bad(in);
            bad[3] = desc({4, 16, 24}, t); // down transposed
            p = exercise(c, {4, 2, 1, 16, 32, 8}, in, {desc({5, 24}, t)}, bad);
            // A gate/up block that is not a multiple of 8 dividing I and Is is refused.
            for (int32_t block : {12, 32, -8})
            {
                std::vector<int32_t> values{4, 2, 1, 16, 32, block};
                std::vector<PluginField> storage;
                PluginFieldCollection fc = fieldsFor(c, storage, values);
                IPluginV3* refused = c->createPlugin("smoke", &fc, TensorRTPhase::kBUILD);
                expect(refused == nullptr, "createPlugin refuses gate_up_block 12, 32 (does not divide I) and -8");
                delete refused;
            }
            if (p != nullptr)
            {
                auto* build = static_cast<IPluginV3OneBuild*>(p->getCapabilityInterface(PluginCapabilityType::kBUILD));
                std::vector<DynamicPluginTensorDesc> out{desc({5, 24}, t)};
                workspace = build->getWorkspaceSize(in.data(), 7, out.data(), 1);
                std::vector<DynamicPluginTensorDesc> fp32(in);
                fp32[0].desc.type = DataType::kFLOAT;
                expect(!build->supportsFormatCombination(0, fp32.data(), 7, 1), "routed experts: no fp32 kernels");
            }
        }
        else if (name == "QmoeRotary")
        {
            // Hq=4, Hkv=2, D=8; B=2, S=3, P=16
            std::vector<DynamicPluginTensorDesc> in{desc({2, 3, 32}, DataType::kHALF), desc({2, 3, 16}, DataType::kHALF),
                desc({16, 4}, DataType::kFLOAT), desc({16, 4}, DataType::kFLOAT), desc({2, 3}, DataType::kINT64)};
            std::vector<DynamicPluginTensorDesc> bad(in);
            bad[1] = desc({2, 3, 32}, DataType::kHALF); // key with query's head count
            p = exercise(c, {4, 2, 8}, in, {desc({2, 3, 32}, DataType::kHALF), desc({2, 3, 16}, DataType::kHALF)}, bad);
        }
        else
        {
            expect(false, "unknown creator name");
        }
        printCreator(c, workspace);
        delete p;
    }
    return gFailures == 0 ? 0 : 1;
}
