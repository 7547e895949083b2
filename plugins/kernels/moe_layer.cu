// The routed-experts layer: parameter checks, workspace carving, stage order and [Combine].
#include "common.cuh"
#include "moe_internal.h"

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <strings.h> // strcasecmp
#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <tuple>
#include <utility>

namespace qmoe
{
namespace
{

constexpr int kCombineThreads = 256;

// out[t] = sum_j y[slot_row[t*k + j]] + y[T*k + t] (shared; times its gate when a.shared_unscaled),
// fp32 in choice order: deterministic.
template <typename T>
__global__ void __launch_bounds__(kCombineThreads) combine_kernel(MoeArgs a)
{
    int const chunks = a.H / 8;
    int64_t const total = static_cast<int64_t>(a.T) * chunks;
    T const* const y = static_cast<T const*>(a.y);
    T* const out = static_cast<T*>(a.out);
    pdl_enter();
    for (int64_t i = blockIdx.x * static_cast<int64_t>(kCombineThreads) + threadIdx.x; i < total;
         i += static_cast<int64_t>(gridDim.x) * kCombineThreads)
    {
        int const t = static_cast<int>(i / chunks);
        int const h = static_cast<int>(i % chunks) * 8;
        float acc[8] = {};
        auto add_row = [&](int64_t row, float scale) {
            float f[8];
            unpack8<T>(load_cached16(y + row * a.H + h), f);
#pragma unroll
            for (int q = 0; q < 8; ++q)
            {
                acc[q] += scale * f[q];
            }
        };
        for (int j = 0; j < a.k; ++j)
        {
            add_row(a.slot_row[static_cast<int64_t>(t) * a.k + j], 1.0f);
        }
        float const shared_scale = a.shared_unscaled ? a.shared_gate[t] : 1.0f;
        for (int s = 0; s < a.has_shared * a.shared_splits; ++s)
        {
            add_row(static_cast<int64_t>(a.T) * a.k + static_cast<int64_t>(s) * a.T + t, shared_scale);
        }
        *reinterpret_cast<uint4*>(out + static_cast<int64_t>(t) * a.H + h) = pack8<T>(acc);
    }
}

template <typename T>
cudaError_t launch_combine_t(MoeArgs const& a, cudaStream_t stream)
{
    int64_t const total = static_cast<int64_t>(a.T) * (a.H / 8);
    int const grid = static_cast<int>(std::min<int64_t>((total + kCombineThreads - 1) / kCombineThreads, 65535));
    return launch_kernel(combine_kernel<T>, dim3(grid), dim3(kCombineThreads), 0, stream, a.pdl != 0, a);
}

constexpr int kMaxDevices = 64;

bool aligned(void const* p, uintptr_t a)
{
    return reinterpret_cast<uintptr_t>(p) % a == 0;
}

enum class Need
{
    kRoute,   // router inputs and the workspace
    kForward, // everything
};

int32_t check_tensor(void const* t)
{
    if (t == nullptr)
    {
        return QMOE_ERR_NULL_POINTER;
    }
    return aligned(t, 16) ? QMOE_OK : QMOE_ERR_MISALIGNED;
}

int32_t check(qmoe_moe_params const* p, Need need)
{
    if (p == nullptr)
    {
        return QMOE_ERR_NULL_POINTER;
    }
    if (p->dtype != QMOE_DTYPE_FP16 && p->dtype != QMOE_DTYPE_BF16)
    {
        return QMOE_ERR_BAD_DTYPE;
    }
    bool const sizes_ok = p->num_tokens >= 0 && p->num_tokens <= kMaxTokens && p->hidden_size > 0
        && p->hidden_size <= kMaxHidden && p->hidden_size % 8 == 0 && p->num_experts >= 1
        && p->num_experts <= kMaxExperts && p->top_k >= 1 && p->top_k <= kMaxTopK && p->top_k <= p->num_experts
        && p->moe_intermediate_size > 0 && p->moe_intermediate_size % 8 == 0 && p->shared_intermediate_size >= 0
        && p->shared_intermediate_size % 8 == 0 && p->path >= QMOE_PATH_AUTO && p->path <= QMOE_PATH_PREFILL_WMMA
        && p->gate_up_block >= 0
        && (p->gate_up_block == 0
            || (p->gate_up_block % 8 == 0 && p->moe_intermediate_size % p->gate_up_block == 0
                && p->shared_intermediate_size % p->gate_up_block == 0));
    if (!sizes_ok)
    {
        return QMOE_ERR_BAD_SHAPE;
    }
    if (p->num_tokens == 0)
    {
        return QMOE_OK;
    }
    // Work items (tiles of 32 rows, columns in steps of 64) are counted in int32 on the device.
    int64_t const rows = static_cast<int64_t>(p->num_tokens) * (p->top_k + 1);
    int64_t const cols = std::max({p->moe_intermediate_size, p->shared_intermediate_size, p->hidden_size}) / 64 + 1;
    if ((rows / 32 + 2 * p->num_experts + 2) * cols > INT32_MAX)
    {
        return QMOE_ERR_BAD_SHAPE;
    }
    bool const shared = p->shared_intermediate_size > 0;
    void const* tensors[8] = {p->hidden, p->router_weight};
    int n = 2;
    if (shared)
    {
        tensors[n++] = p->shared_expert_gate_weight;
    }
    if (need == Need::kForward)
    {
        tensors[n++] = p->gate_up_weight;
        tensors[n++] = p->down_weight;
        tensors[n++] = p->output;
        if (shared)
        {
            tensors[n++] = p->shared_gate_up_weight;
            tensors[n++] = p->shared_down_weight;
        }
    }
    for (int i = 0; i < n; ++i)
    {
        int32_t const status = check_tensor(tensors[i]);
        if (status != QMOE_OK)
        {
            return status;
        }
    }
    if (p->workspace == nullptr)
    {
        return QMOE_ERR_NULL_POINTER;
    }
    if (!aligned(p->workspace, 256))
    {
        return QMOE_ERR_MISALIGNED;
    }
    if (p->workspace_size < qmoe_moe_workspace_size(p))
    {
        return QMOE_ERR_WORKSPACE;
    }
    return QMOE_OK;
}

MoeArgs make_args(qmoe_moe_params const* p)
{
    MoeArgs a{};
    a.T = p->num_tokens;
    a.H = p->hidden_size;
    a.E = p->num_experts;
    a.k = p->top_k;
    a.I = p->moe_intermediate_size;
    a.Is = p->shared_intermediate_size;
    a.has_shared = a.Is > 0 ? 1 : 0;
    a.G = a.E + a.has_shared;
    a.norm_topk_prob = p->norm_topk_prob != 0;
    a.shared_splits = 1;
    a.shared_parts = 1;
    a.interleave = 0;
    a.router_splits = 1;
    a.pdl = pdl_enabled() ? 1 : 0;
    a.gate_up_block = p->gate_up_block;
    a.x = p->hidden;
    a.router_w = p->router_weight;
    a.gate_up_w = p->gate_up_weight;
    a.down_w = p->down_weight;
    a.shared_gate_up_w = p->shared_gate_up_weight;
    a.shared_down_w = p->shared_down_weight;
    a.shared_gate_w = p->shared_expert_gate_weight;
    a.out = p->output;
    if (p->workspace != nullptr)
    {
        WorkspaceLayout const l = workspace_layout(a.T, a.H, a.E, a.k, a.I, a.Is, 2);
        char* const ws = static_cast<char*>(p->workspace);
        a.logits = reinterpret_cast<float*>(ws + l.logits);
        a.topk_ids = reinterpret_cast<int32_t*>(ws + l.topk_ids);
        a.topk_weights = reinterpret_cast<float*>(ws + l.topk_weights);
        a.shared_gate = reinterpret_cast<float*>(ws + l.shared_gate);
        a.group_count = reinterpret_cast<int32_t*>(ws + l.group_count);
        a.group_offset = reinterpret_cast<int32_t*>(ws + l.group_offset);
        a.row_token = reinterpret_cast<int32_t*>(ws + l.row_token);
        a.row_weight = reinterpret_cast<float*>(ws + l.row_weight);
        a.slot_row = reinterpret_cast<int32_t*>(ws + l.slot_row);
        a.cta_count = reinterpret_cast<int32_t*>(ws + l.cta_count);
        a.act = ws + l.act;
        a.y = ws + l.y;
        a.sm90_scratch = kHasSm90Gemm ? ws + l.sm90_scratch : nullptr;
    }
    return a;
}

// Prefill: CUTLASS wgmma grouped GEMMs on Hopper when built with them, else the portable WMMA path.
// They take weights in the concatenated layout (SwiGLU in its own pass) or in
// QMOE_GATE_UP_FUSED_BLOCK blocks (SwiGLU in GEMM 1's epilogue); other blocks take the WMMA path.
bool use_sm90(int path, int gate_up_block)
{
#ifdef QMOE_HAS_SM90_GEMM
    return path != QMOE_PATH_PREFILL_WMMA && (gate_up_block == 0 || gate_up_block == QMOE_GATE_UP_FUSED_BLOCK)
        && device_capability() == 90; // sm_90a code runs on 9.0 only
#else
    (void) path;
    (void) gate_up_block;
    return false;
#endif
}

cudaError_t launch_prefill(MoeArgs const& a, bool sm90, int dtype, cudaStream_t stream, SideLaunch const* side)
{
#ifdef QMOE_HAS_SM90_GEMM
    if (sm90)
    {
        return dtype == QMOE_DTYPE_BF16 ? launch_experts_sm90_bf16(a, stream, side)
                                        : launch_experts_sm90_fp16(a, stream, side);
    }
#else
    (void) side;
#endif
    return launch_experts_prefill(a, dtype, stream);
}

// QMOE_SHARED_STREAM: one side stream and its fork/join events per (device, main stream), created
// on the first layer enqueued on that stream outside a stream capture and kept for the process (like
// a cuBLAS handle). Per main stream: a capture of one stream never pulls in another stream's side
// work, and layers enqueued concurrently on different streams do not wait on each other. The mutex
// keeps one layer's fork ... join whole when several host threads share a main stream. The handle
// cudaStreamPerThread names a different stream in each host thread, so it is keyed by thread too.
struct SideStream
{
    std::mutex mutex;
    cudaStream_t stream = nullptr;
    cudaEvent_t fork = nullptr;
    cudaEvent_t join = nullptr;
};

SideStream* side_stream(cudaStream_t main)
{
    static std::mutex create;
    static std::map<std::tuple<int, cudaStream_t, std::thread::id>, std::unique_ptr<SideStream>> streams;
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess)
    {
        return nullptr;
    }
    std::lock_guard<std::mutex> const lock(create);
    auto const key
        = std::make_tuple(dev, main, main == cudaStreamPerThread ? std::this_thread::get_id() : std::thread::id{});
    auto const it = streams.find(key);
    if (it != streams.end())
    {
        return it->second.get(); // nullptr: creating it failed before
    }
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(main, &capture) != cudaSuccess)
    {
        (void) cudaGetLastError(); // not a later launch's error: this layer runs on one stream
        return nullptr;
    }
    if (capture != cudaStreamCaptureStatusNone)
    {
        return nullptr; // not created inside a capture: this layer runs on one stream
    }
    auto s = std::make_unique<SideStream>();
    bool const ok = cudaStreamCreateWithFlags(&s->stream, cudaStreamNonBlocking) == cudaSuccess
        && cudaEventCreateWithFlags(&s->fork, cudaEventDisableTiming) == cudaSuccess
        && cudaEventCreateWithFlags(&s->join, cudaEventDisableTiming) == cudaSuccess;
    if (!ok)
    {
        (void) cudaGetLastError(); // the one-stream schedule still works
        if (s->join != nullptr)
        {
            (void) cudaEventDestroy(s->join);
        }
        if (s->fork != nullptr)
        {
            (void) cudaEventDestroy(s->fork);
        }
        if (s->stream != nullptr)
        {
            (void) cudaStreamDestroy(s->stream);
        }
        s.reset();
    }
    return (streams[key] = std::move(s)).get(); // kept for the process: one entry per stream ever used
}

cudaError_t launch_shared_gemm1(MoeArgs const& a, int dtype, SideLaunch const& side)
{
#ifdef QMOE_HAS_SM90_GEMM
    return dtype == QMOE_DTYPE_BF16 ? launch_shared_gemm1_sm90_bf16(a, side) : launch_shared_gemm1_sm90_fp16(a, side);
#else
    (void) a;
    (void) dtype;
    (void) side;
    return cudaErrorNotSupported;
#endif
}

// A boolean switch: a number (0 = off, else on), on/off, true/false or yes/no in any case; unset,
// empty or anything else -> fallback (as env_int: junk means the default).
bool env_flag(char const* name, bool fallback)
{
    char const* const v = std::getenv(name);
    if (v == nullptr || *v == '\0')
    {
        return fallback;
    }
    char* end = nullptr;
    long const n = std::strtol(v, &end, 10);
    if (*end == '\0')
    {
        return n != 0;
    }
    for (char const* on : {"on", "true", "yes"}) // numbers were taken above
    {
        if (strcasecmp(v, on) == 0)
        {
            return true;
        }
    }
    for (char const* off : {"off", "false", "no"})
    {
        if (strcasecmp(v, off) == 0)
        {
            return false;
        }
    }
    return fallback;
}

int env_int(char const* name, int fallback, int lo, int hi)
{
    char const* const v = std::getenv(name);
    if (v == nullptr || *v == '\0')
    {
        return fallback;
    }
    char* end = nullptr;
    long const n = std::strtol(v, &end, 10);
    return *end != '\0' ? fallback : static_cast<int>(std::min<long>(hi, std::max<long>(lo, n)));
}

int32_t status_of(cudaError_t err)
{
    return err == cudaSuccess ? QMOE_OK : QMOE_ERR_CUDA;
}

} // namespace

bool pdl_enabled()
{
    if (!tuning().pdl)
    {
        return false;
    }
    static std::atomic<int> known[kMaxDevices] = {}; // 0: not asked yet, 1: yes, 2: no
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kMaxDevices)
    {
        return false;
    }
    int v = known[dev].load(std::memory_order_relaxed);
    if (v == 0)
    {
        cudaFuncAttributes attr{};
        bool const ok = device_capability() >= 90
            && cudaFuncGetAttributes(&attr, combine_kernel<__nv_bfloat16>) == cudaSuccess && attr.ptxVersion >= 90;
        if (!ok)
        {
            (void) cudaGetLastError(); // a failed query must not surface as a later launch's error
        }
        v = ok ? 1 : 2;
        known[dev].store(v, std::memory_order_relaxed);
    }
    return v == 1;
}

Tuning const& tuning()
{
    static Tuning const t{env_flag("QMOE_PDL", true), env_flag("QMOE_ROUTER_TC", true),
        env_int("QMOE_PERMUTE_CTAS", kDefaultPermuteCtas, 1, kMaxPermuteCtas), env_flag("QMOE_DECODE_SPLIT", true),
        env_int("QMOE_SHARED_STREAM", kSharedStreamAuto, 0, kMaxSharedStreamSms), env_int("QMOE_DECODE_MMA", 0, 0, kMaxDecodeMmaTokens),
        env_int("QMOE_SHARED_INTERLEAVE", kInterleaveAuto, 0, kMaxSharedParts),
        env_int("QMOE_TILE_ROWS", kDefaultTileRows, 1, kMaxTileRows), env_int("QMOE_DECODE_MAX_TOKENS", 0, 0, kMaxTokens),
        env_int("QMOE_SWAP_AB", 0, 0, kMaxTileRows), env_flag("QMOE_GEMM_PDL", false),
        env_flag("QMOE_SKIP_PAD", false)};
    return t;
}

} // namespace qmoe

using namespace qmoe;

extern "C" size_t qmoe_moe_workspace_size(qmoe_moe_params const* p)
{
    if (p == nullptr || p->num_tokens < 0 || p->num_tokens > kMaxTokens || p->hidden_size <= 0
        || p->num_experts < 1 || p->num_experts > kMaxExperts || p->top_k < 1 || p->top_k > kMaxTopK
        || p->moe_intermediate_size <= 0 || p->shared_intermediate_size < 0)
    {
        return 0;
    }
    return workspace_layout(p->num_tokens, p->hidden_size, p->num_experts, p->top_k, p->moe_intermediate_size,
        p->shared_intermediate_size, 2)
        .total;
}

extern "C" int32_t qmoe_moe_check(qmoe_moe_params const* p)
{
    return check(p, Need::kForward);
}

extern "C" int32_t qmoe_moe_forward(qmoe_moe_params const* p, cudaStream_t stream)
{
    int32_t const status = check(p, Need::kForward);
    if (status != QMOE_OK || p->num_tokens == 0)
    {
        return status;
    }
    MoeArgs a = make_args(p);
    bool const sm90 = use_sm90(p->path, p->gate_up_block);
    // Decode (GEMV) up to a few tokens; above, the grouped GEMMs. Hopper's wgmma path already beats
    // the GEMV at 8 tokens (H100, 57B dims: 1.01 vs 1.11 ms), the portable WMMA path does not.
    // QMOE_DECODE_MMA=n: the tensor-core decode path, taken up to n tokens.
    bool const mma = tuning().decode_mma_tokens > 0 && device_capability() >= 80;
    int const threshold = p->decode_max_tokens > 0 ? p->decode_max_tokens
        : tuning().decode_max_tokens > 0           ? tuning().decode_max_tokens
        : mma                                      ? tuning().decode_mma_tokens
                                                   : (sm90 ? kDefaultDecodeMaxTokensSm90 : kDefaultDecodeMaxTokens);
    bool const decode = p->path == QMOE_PATH_DECODE || (p->path == QMOE_PATH_AUTO && a.T <= threshold);
    if ((!decode && sm90) || (decode && (tuning().decode_split || mma)))
    {
        a.shared_splits = shared_splits_for(a.T, a.Is);
    }
    int const interleave = interleave_parts(tuning().shared_interleave, a.T, a.k, a.E, a.Is);
    if (!decode && sm90 && interleave > 0)
    {
        a.shared_parts = shared_gemm1_parts(a.Is, interleave, swiglu_in_gemm1(a));
        a.interleave = 1;
    }

    // QMOE_SHARED_STREAM: fork the shared expert's GEMM 1 (it needs no routing) onto the side stream
    // before the router; [Experts] joins it after its GEMM 1 (before SwiGLU, or GEMM 2 when SwiGLU is in
    // GEMM 1's epilogue). Once forked, the join is recorded and
    // waited on whatever fails, so a capture never ends with an unjoined branch and no side work
    // outlives the call unordered.
    int const stream_sms = shared_stream_sms_for(tuning().shared_stream_sms, a.T, a.k, a.E);
    SideStream* const ss = !decode && sm90 && a.has_shared && stream_sms > 0 ? side_stream(stream) : nullptr;
    std::unique_lock<std::mutex> side_lock;
    SideLaunch side{};
    bool forked = false;
    bool joined = false;
    cudaError_t err = cudaSuccess;
    if (ss != nullptr)
    {
        // SwiGLU in the side stream's GEMM 1 epilogue cannot apply the shared gate (not computed yet).
        a.shared_unscaled = swiglu_in_gemm1(a) ? 1 : 0;
        side_lock = std::unique_lock<std::mutex>(ss->mutex);
        side = SideLaunch{ss->stream, ss->join, stream_sms};
        err = cudaEventRecord(ss->fork, stream);
        if (err == cudaSuccess)
        {
            err = cudaStreamWaitEvent(ss->stream, ss->fork, 0);
            forked = err == cudaSuccess;
        }
        if (err == cudaSuccess)
        {
            err = launch_shared_gemm1(a, p->dtype, side);
        }
        if (forked)
        {
            cudaError_t const recorded = cudaEventRecord(ss->join, ss->stream);
            joined = recorded == cudaSuccess;
            err = err != cudaSuccess ? err : recorded;
        }
    }
    if (err == cudaSuccess)
    {
        err = launch_router(a, p->dtype, a.topk_ids, a.topk_weights, a.shared_gate, false, stream);
    }
    if (err == cudaSuccess)
    {
        err = launch_permute(a, stream);
    }
    if (err == cudaSuccess)
    {
        err = decode ? launch_experts_decode(a, p->dtype, mma, stream)
                     : launch_prefill(a, sm90, p->dtype, stream, forked ? &side : nullptr);
    }
    if (err == cudaSuccess)
    {
        err = p->dtype == QMOE_DTYPE_BF16 ? launch_combine_t<__nv_bfloat16>(a, stream)
                                          : launch_combine_t<__half>(a, stream);
    }
    // On success [Experts] waited on the join after its GEMM 1. On an error path: join here, or, if the
    // join could not even be recorded, wait for the side stream from the host (outside a capture).
    if (forked && err != cudaSuccess)
    {
        cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
        if (joined)
        {
            (void) cudaStreamWaitEvent(stream, ss->join, 0);
        }
        else if (cudaStreamIsCapturing(stream, &capture) == cudaSuccess && capture == cudaStreamCaptureStatusNone)
        {
            // Relaxed: allowed while another host thread captures in global mode.
            cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
            (void) cudaThreadExchangeStreamCaptureMode(&mode);
            (void) cudaStreamSynchronize(ss->stream);
            (void) cudaThreadExchangeStreamCaptureMode(&mode);
        }
    }
    return status_of(err);
}

extern "C" int32_t qmoe_moe_route(
    qmoe_moe_params const* p, int32_t* topk_ids, float* topk_weights, float* shared_gate, cudaStream_t stream)
{
    int32_t const status = check(p, Need::kRoute);
    if (status != QMOE_OK || p->num_tokens == 0)
    {
        return status;
    }
    if (topk_ids == nullptr || topk_weights == nullptr || (p->shared_intermediate_size > 0 && shared_gate == nullptr))
    {
        return QMOE_ERR_NULL_POINTER;
    }
    MoeArgs const a = make_args(p);
    return status_of(launch_router(a, p->dtype, topk_ids, topk_weights, shared_gate, true, stream));
}

extern "C" char const* qmoe_status_string(int32_t status)
{
    switch (status)
    {
    case QMOE_OK: return "ok";
    case QMOE_ERR_NULL_POINTER: return "a required pointer is NULL";
    case QMOE_ERR_BAD_SHAPE: return "a size is out of range or not a multiple of 8";
    case QMOE_ERR_BAD_DTYPE: return "dtype not supported";
    case QMOE_ERR_MISALIGNED: return "a tensor is not 16-byte aligned (workspace: 256-byte)";
    case QMOE_ERR_WORKSPACE: return "workspace smaller than qmoe_moe_workspace_size()";
    case QMOE_ERR_CUDA: return "CUDA error";
    default: return "unknown qmoe status";
    }
}

extern "C" int32_t qmoe_kernels_features(void)
{
    Tuning const& t = tuning();
    return (kHasSm90Gemm ? QMOE_FEATURE_SM90_GEMM : 0) | (t.pdl ? QMOE_FEATURE_PDL : 0)
        | (t.router_tc ? QMOE_FEATURE_ROUTER_TC : 0) | (t.permute_ctas > 1 ? QMOE_FEATURE_PERMUTE_MULTI : 0)
        | (t.shared_stream_sms != 0 ? QMOE_FEATURE_SHARED_STREAM : 0) | (t.decode_split ? QMOE_FEATURE_DECODE_SPLIT : 0)
        | (t.decode_mma_tokens > 0 ? QMOE_FEATURE_DECODE_MMA : 0)
        | (t.shared_interleave != 0 ? QMOE_FEATURE_SHARED_INTERLEAVE : 0)
        | (t.tile_rows != kDefaultTileRows ? QMOE_FEATURE_TILE_ROWS : 0)
        | (t.decode_max_tokens > 0 ? QMOE_FEATURE_DECODE_MAX_TOKENS : 0) | (t.swap_ab_rows > 0 ? QMOE_FEATURE_SWAP_AB : 0)
        | (t.gemm_pdl ? QMOE_FEATURE_GEMM_PDL : 0) | (t.skip_pad ? QMOE_FEATURE_SKIP_PAD : 0);
}

extern "C" int32_t qmoe_kernels_abi_version(void)
{
    return QMOE_KERNELS_ABI_VERSION;
}
