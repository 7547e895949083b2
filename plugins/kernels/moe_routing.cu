// [Router] and [Permute] stages of the routed-experts layer.
#include "common.cuh"
#include "moe_internal.h"

#include <climits>
#include <cmath>

namespace qmoe
{
namespace
{

constexpr int kRouterThreads = 256;
constexpr int kRouterWarps = kRouterThreads / kWarp;
constexpr int kRouterTokens = 4; // token rows staged per CTA: each weight row is read once per 4 tokens
constexpr int kLogitsPerLane = kMaxExperts / kWarp;
constexpr int kPermuteThreads = 1024;

struct RouterOut
{
    int32_t* ids;       // [T, k]
    float* weights;     // [T, k]
    float* shared_gate; // [T] or nullptr
};

// Logits of kTok tokens x (kRouterWarps * kRows) weight rows per CTA (grid: token blocks x row
// blocks, rows = E routed + 1 shared gate). Each lane reads 16-byte chunks of its warp's kRows rows
// once and applies them to every staged token. Few tokens: <4, 1> spreads the router matrix over
// many SMs; many tokens: <16, 2> reads each weight row once per 16 tokens and each staged token
// row once per 16 weight rows (at 4096 tokens, 57B dims: ~4x less L2 traffic than <4, 1>).
template <typename T, int kTok, int kRows>
__global__ void __launch_bounds__(kRouterThreads) router_logits_kernel(MoeArgs a)
{
    extern __shared__ uint4 s_x[]; // [kTok][H/8]
    int const chunks = a.H / 8;
    int const rows = a.E + a.has_shared;
    int const t0 = blockIdx.x * kTok;
    int const nt = min(kTok, a.T - t0);
    int const e0 = (blockIdx.y * kRouterWarps + threadIdx.x / kWarp) * kRows;
    int const lane = threadIdx.x % kWarp;
    T const* x = static_cast<T const*>(a.x);

    for (int c = threadIdx.x; c < kTok * chunks; c += kRouterThreads)
    {
        int const r = c / chunks;
        int const kc = c % chunks;
        s_x[c] = r < nt ? load_cached16(x + (static_cast<int64_t>(t0 + r) * a.H + kc * 8)) : make_uint4(0, 0, 0, 0);
    }
    __syncthreads();
    if (e0 >= rows)
    {
        return;
    }

    T const* w[kRows];
#pragma unroll
    for (int j = 0; j < kRows; ++j)
    {
        int const e = min(e0 + j, rows - 1); // rows past the end recompute the last one, never stored
        w[j] = e < a.E ? static_cast<T const*>(a.router_w) + static_cast<int64_t>(e) * a.H
                       : static_cast<T const*>(a.shared_gate_w);
    }
    float acc[kRows][kTok] = {};
#pragma unroll 2
    for (int kc = lane; kc < chunks; kc += kWarp)
    {
        float wf[kRows][8];
#pragma unroll
        for (int j = 0; j < kRows; ++j)
        {
            unpack8<T>(load_cached16(w[j] + kc * 8), wf[j]);
        }
#pragma unroll
        for (int r = 0; r < kTok; ++r)
        {
            float xf[8];
            unpack8<T>(s_x[r * chunks + kc], xf);
#pragma unroll
            for (int j = 0; j < kRows; ++j)
            {
#pragma unroll
                for (int q = 0; q < 8; ++q)
                {
                    acc[j][r] = fmaf(wf[j][q], xf[q], acc[j][r]);
                }
            }
        }
    }
#pragma unroll
    for (int j = 0; j < kRows; ++j)
    {
#pragma unroll
        for (int r = 0; r < kTok; ++r)
        {
            float const v = warp_sum(acc[j][r]);
            if (lane == 0 && r < nt && e0 + j < rows)
            {
                a.logits[static_cast<int64_t>(t0 + r) * rows + e0 + j] = round_to<T>(v); // as a bf16/fp16 Linear returns it
            }
        }
    }
}

// One warp per token: fp32 softmax over the E routed logits, top-k, optional renormalisation,
// shared-expert gate.
__global__ void __launch_bounds__(kRouterThreads) router_topk_kernel(MoeArgs a, RouterOut o)
{
    int const t = blockIdx.x * kRouterWarps + threadIdx.x / kWarp;
    int const lane = threadIdx.x % kWarp;
    if (t >= a.T)
    {
        return;
    }
    float const* logits = a.logits + static_cast<int64_t>(t) * (a.E + a.has_shared);

    // Lane l holds experts l, l+32, ...
    float p[kLogitsPerLane];
    float m = -INFINITY;
#pragma unroll
    for (int j = 0; j < kLogitsPerLane; ++j)
    {
        int const e = lane + kWarp * j;
        p[j] = e < a.E ? logits[e] : -INFINITY;
        m = fmaxf(m, p[j]);
    }
#pragma unroll
    for (int off = kWarp / 2; off > 0; off >>= 1)
    {
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    }
    float s = 0.0f;
#pragma unroll
    for (int j = 0; j < kLogitsPerLane; ++j)
    {
        int const e = lane + kWarp * j;
        p[j] = e < a.E ? expf(p[j] - m) : 0.0f;
        s += p[j];
    }
    s = warp_sum(s);
    float const inv = 1.0f / s;

    // Top-k: k rounds of a warp arg-max; ties and NaNs resolve to the lowest unused expert id.
    unsigned taken = 0;
    float my_w = 0.0f;
    int my_id = 0;
    for (int j = 0; j < a.k; ++j)
    {
        float bv = -INFINITY;
        int bi = INT_MAX;
#pragma unroll
        for (int q = 0; q < kLogitsPerLane; ++q)
        {
            int const e = lane + kWarp * q;
            float const v = p[q] * inv;
            float const vv = v == v ? v : -INFINITY; // NaN never wins over a number
            if (e < a.E && !(taken >> q & 1u) && (vv > bv || (vv == bv && e < bi)))
            {
                bv = vv;
                bi = e;
            }
        }
#pragma unroll
        for (int off = kWarp / 2; off > 0; off >>= 1)
        {
            float const ov = __shfl_xor_sync(0xffffffffu, bv, off);
            int const oi = __shfl_xor_sync(0xffffffffu, bi, off);
            if (ov > bv || (ov == bv && oi < bi))
            {
                bv = ov;
                bi = oi;
            }
        }
        if (bi % kWarp == lane)
        {
            taken |= 1u << (bi / kWarp);
        }
        if (lane == j)
        {
            my_w = bv;
            my_id = bi;
        }
    }
    if (a.norm_topk_prob)
    {
        float const sum = warp_sum(lane < a.k ? my_w : 0.0f);
        my_w = my_w / sum;
    }
    if (lane < a.k)
    {
        o.ids[static_cast<int64_t>(t) * a.k + lane] = my_id;
        o.weights[static_cast<int64_t>(t) * a.k + lane] = my_w;
    }
    if (lane == 0 && a.has_shared && o.shared_gate != nullptr)
    {
        o.shared_gate[t] = 1.0f / (1.0f + expf(-logits[a.E]));
    }
}

// Exclusive prefix sum of v[0..n) into out[0..n] by one warp (n <= kMaxGroups).
__device__ void warp_exclusive_scan(int const* v, int* out, int n, int lane)
{
    int carry = 0;
    for (int base = 0; base < n; base += kWarp)
    {
        int const i = base + lane;
        int x = i < n ? v[i] : 0;
#pragma unroll
        for (int o = 1; o < kWarp; o <<= 1)
        {
            int const y = __shfl_up_sync(0xffffffffu, x, o);
            if (lane >= o)
            {
                x += y;
            }
        }
        if (i < n)
        {
            out[i + 1] = carry + x;
        }
        carry += __shfl_sync(0xffffffffu, x, kWarp - 1);
    }
    if (lane == 0)
    {
        out[0] = 0;
    }
}

// Single CTA: counts per group, offsets, and the permuted rows. Row order inside a group follows
// shared-memory atomics (not deterministic), which does not change any result: every row is computed
// independently and the combine sums each token's k rows in choice order.
__global__ void __launch_bounds__(kPermuteThreads) permute_kernel(MoeArgs a)
{
    __shared__ int s_count[kMaxGroups];
    __shared__ int s_offset[kMaxGroups + 1];
    __shared__ int s_cursor[kMaxGroups];

    int const slots = a.T * a.k;
    for (int g = threadIdx.x; g < a.G; g += kPermuteThreads)
    {
        s_count[g] = (a.has_shared && g == a.E) ? a.T : 0;
    }
    __syncthreads();
    for (int s = threadIdx.x; s < slots; s += kPermuteThreads)
    {
        int const e = min(max(a.topk_ids[s], 0), a.E - 1); // ids come from the router; clamp for memory safety
        atomicAdd(&s_count[e], 1);
    }
    __syncthreads();
    if (threadIdx.x < kWarp)
    {
        warp_exclusive_scan(s_count, s_offset, a.G, threadIdx.x);
    }
    __syncthreads();
    for (int g = threadIdx.x; g <= a.G; g += kPermuteThreads)
    {
        a.group_offset[g] = s_offset[g];
        if (g < a.G)
        {
            a.group_count[g] = s_count[g];
            s_cursor[g] = s_offset[g];
        }
    }
    __syncthreads();
    for (int s = threadIdx.x; s < slots; s += kPermuteThreads)
    {
        int const e = min(max(a.topk_ids[s], 0), a.E - 1);
        int const row = atomicAdd(&s_cursor[e], 1);
        a.row_token[row] = s / a.k;
        a.row_weight[row] = a.topk_weights[s];
        a.slot_row[s] = row;
    }
    if (a.has_shared)
    {
        for (int t = threadIdx.x; t < a.T; t += kPermuteThreads)
        {
            a.row_token[slots + t] = t;
            a.row_weight[slots + t] = a.shared_gate[t];
        }
    }
}

template <typename T, int kTok, int kRows>
cudaError_t launch_logits(MoeArgs const& a, cudaStream_t stream)
{
    size_t const smem = sizeof(T) * kTok * a.H;
    cudaError_t const err = cudaFuncSetAttribute(
        router_logits_kernel<T, kTok, kRows>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess)
    {
        return err;
    }
    dim3 const grid(ceil_div(a.T, kTok), ceil_div(a.E + a.has_shared, kRouterWarps * kRows));
    router_logits_kernel<T, kTok, kRows><<<grid, kRouterThreads, smem, stream>>>(a);
    return cudaGetLastError();
}

template <typename T>
cudaError_t launch_router_t(MoeArgs const& a, RouterOut o, cudaStream_t stream)
{
    // 16 staged tokens need 16 * H * 2 bytes of shared memory: up to H = 5120 (160 KB).
    bool const many = a.T >= 64 && a.H <= 5120;
    cudaError_t const err = many ? launch_logits<T, 16, 2>(a, stream) : launch_logits<T, kRouterTokens, 1>(a, stream);
    if (err != cudaSuccess)
    {
        return err;
    }
    router_topk_kernel<<<ceil_div(a.T, kRouterWarps), kRouterThreads, 0, stream>>>(a, o);
    return cudaGetLastError();
}

} // namespace

cudaError_t launch_router(MoeArgs const& a, int dtype, int32_t* ids, float* weights, float* shared_gate,
    cudaStream_t stream)
{
    RouterOut const o{ids, weights, shared_gate};
    return dtype == QMOE_DTYPE_BF16 ? launch_router_t<__nv_bfloat16>(a, o, stream)
                                    : launch_router_t<__half>(a, o, stream);
}

cudaError_t launch_permute(MoeArgs const& a, cudaStream_t stream)
{
    permute_kernel<<<1, kPermuteThreads, 0, stream>>>(a);
    return cudaGetLastError();
}

} // namespace qmoe
