// [Router] and [Permute] stages of the routed-experts layer.
#include "common.cuh"
#include "moe_internal.h"

#include <mma.h>

#include <algorithm>
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
    int trigger_first;  // the permutation follows (pdl_trigger_first); 0: the caller's kernels do (pdl_enter)
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
    pdl_enter();

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

// Tensor-core router (QMOE_ROUTER_TC=1): logits of 16*kMF tokens x 80 weight rows per CTA on
// WMMA 16x16x16 tiles with fp32 accumulation, one 16-row fragment per warp, K streamed through a
// two-stage cp.async pipeline in 64-element steps. grid.z splits K: split s writes its fp32 partial
// sums to logits[s] and [TopK] adds the router_splits parts in order (deterministic), then rounds.
constexpr int kTcWarps = 5;
constexpr int kTcThreads = kTcWarps * kWarp;
constexpr int kTcRows = 16 * kTcWarps; // weight rows per CTA: 64 routed experts + the shared gate fit one
constexpr int kTcK = 64;               // K elements per pipeline stage
constexpr int kTcLd = kTcK + 8;        // shared-memory row pitch (144 bytes: rows start on different banks)

template <typename T, int kMF>
__global__ void __launch_bounds__(kTcThreads) router_logits_tc_kernel(MoeArgs a)
{
    using namespace nvcuda;
    constexpr int kTok = 16 * kMF;
    __shared__ __align__(128) T s_a[2][kTok][kTcLd];
    __shared__ __align__(128) T s_b[2][kTcRows][kTcLd];
    __shared__ __align__(128) float s_c[kTcWarps][kTok][16];

    int const rows = a.E + a.has_shared;
    int const t0 = blockIdx.x * kTok;
    int const r0 = blockIdx.y * kTcRows;
    int const chunks = ceil_div(a.H, kTcK);
    int const c_begin = static_cast<int>(static_cast<int64_t>(chunks) * blockIdx.z / gridDim.z);
    int const c_end = static_cast<int>(static_cast<int64_t>(chunks) * (blockIdx.z + 1) / gridDim.z);
    int const warp = threadIdx.x / kWarp;
    int const lane = threadIdx.x % kWarp;
    T const* const x = static_cast<T const*>(a.x);
    T const* const router_w = static_cast<T const*>(a.router_w);
    T const* const shared_gate_w = static_cast<T const*>(a.shared_gate_w);
    pdl_enter();

    // Stage K chunk c into buffer buf: token rows into s_a, weight rows into s_b, zeros past T, past
    // the last weight row and past H (H % 8 == 0: a 16-byte vector is wholly in or out).
    auto stage = [&](int buf, int c) {
        constexpr int kVec = kTcK / 8;
        int const k0 = c * kTcK;
        for (int v = threadIdx.x; v < (kTok + kTcRows) * kVec; v += kTcThreads)
        {
            int const row = v / kVec;
            int const kk = (v % kVec) * 8;
            bool const k_ok = k0 + kk < a.H;
            if (row < kTok)
            {
                int const t = t0 + row;
                bool const ok = k_ok && t < a.T;
                cp_async16(&s_a[buf][row][kk], ok ? x + static_cast<int64_t>(t) * a.H + k0 + kk : x, ok);
            }
            else
            {
                int const r = r0 + row - kTok;
                bool const ok = k_ok && r < rows;
                T const* const w = r < a.E ? router_w + static_cast<int64_t>(r) * a.H : shared_gate_w;
                cp_async16(&s_b[buf][row - kTok][kk], ok ? w + k0 + kk : x, ok);
            }
        }
        cp_async_commit();
    };

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kMF];
#pragma unroll
    for (int m = 0; m < kMF; ++m)
    {
        wmma::fill_fragment(acc[m], 0.0f);
    }
    if (c_begin < c_end)
    {
        stage(0, c_begin);
    }
    for (int c = c_begin; c < c_end; ++c)
    {
        int const buf = (c - c_begin) & 1;
        if (c + 1 < c_end)
        {
            stage(buf ^ 1, c + 1); // that buffer was released by the barrier that ended the last trip
            cp_async_wait<1>();
        }
        else
        {
            cp_async_wait<0>();
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < kTcK; kk += 16)
        {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b; // b(k, n) = W[n][k]
            wmma::load_matrix_sync(b, &s_b[buf][warp * 16][kk], kTcLd);
#pragma unroll
            for (int m = 0; m < kMF; ++m)
            {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> af;
                wmma::load_matrix_sync(af, &s_a[buf][m * 16][kk], kTcLd);
                wmma::mma_sync(acc[m], af, b, acc[m]);
            }
        }
        __syncthreads();
    }

    // Each warp writes its 16 weight rows x kTok tokens (fragment layout is opaque: via shared memory).
#pragma unroll
    for (int m = 0; m < kMF; ++m)
    {
        wmma::store_matrix_sync(&s_c[warp][m * 16][0], acc[m], 16, wmma::mem_row_major);
    }
    __syncwarp();
    float* const part = a.logits + static_cast<int64_t>(blockIdx.z) * a.T * rows;
    for (int i = lane; i < kTok * 16; i += kWarp)
    {
        int const t = t0 + i / 16;
        int const r = r0 + warp * 16 + i % 16;
        if (t < a.T && r < rows)
        {
            part[static_cast<int64_t>(t) * rows + r] = s_c[warp][i / 16][i % 16];
        }
    }
}

// One warp per token: the logit of each row is the sum of the router_splits partials rounded to T
// (as a bf16/fp16 nn.Linear returns it), then fp32 softmax over the E routed logits, top-k,
// optional renormalisation, shared-expert gate.
template <typename T>
__global__ void __launch_bounds__(kRouterThreads) router_topk_kernel(MoeArgs a, RouterOut o)
{
    int const t = blockIdx.x * kRouterWarps + threadIdx.x / kWarp;
    int const lane = threadIdx.x % kWarp;
    if (o.trigger_first)
    {
        pdl_trigger_first();
    }
    else
    {
        pdl_enter();
    }
    if (t >= a.T)
    {
        return;
    }
    int64_t const rows = a.E + a.has_shared;
    int64_t const split_pitch = static_cast<int64_t>(a.T) * rows;
    float const* const row_logits = a.logits + static_cast<int64_t>(t) * rows;
    auto logit = [&](int e) {
        float v = 0.0f;
        for (int s = 0; s < a.router_splits; ++s)
        {
            v += row_logits[s * split_pitch + e];
        }
        return round_to<T>(v);
    };

    // Lane l holds experts l, l+32, ...
    float p[kLogitsPerLane];
    float m = -INFINITY;
#pragma unroll
    for (int j = 0; j < kLogitsPerLane; ++j)
    {
        int const e = lane + kWarp * j;
        p[j] = e < a.E ? logit(e) : -INFINITY;
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
        o.shared_gate[t] = 1.0f / (1.0f + expf(-logit(a.E)));
    }
}

// Expert of routed slot s (ids come from the router; clamped for memory safety).
__device__ __forceinline__ int slot_expert(MoeArgs const& a, int s)
{
    return min(max(a.topk_ids[s], 0), a.E - 1);
}

// s_count[e] += routed slots in [begin, end) that chose expert e (this CTA's threads).
__device__ __forceinline__ void count_slots(MoeArgs const& a, int* s_count, int begin, int end)
{
    for (int s = begin + threadIdx.x; s < end; s += kPermuteThreads)
    {
        atomicAdd(&s_count[slot_expert(a, s)], 1);
    }
}

// A permutation CTA's per-group state in shared memory.
struct PermuteGroups
{
    int count[kMaxGroups];      // rows of each group (all CTAs)
    int offset[kMaxGroups + 1]; // first permuted row of each group
    int cursor[kMaxGroups];     // rows of each group placed before this CTA's, then the next free row
};

// The common end of both permutations, once p.count holds every group's rows (all CTAs) and p.cursor
// the rows of each group owned by earlier CTAs: offsets (a scan), the group arrays (CTA 0), this
// CTA's slots [begin, end) placed after the cursors, and the shared rows (grid-stride over CTAs).
// Row order inside a group follows shared-memory atomics (not deterministic), which does not change
// any result: every row is computed independently and the combine sums each token's k rows in
// choice order.
__device__ void place_slots(MoeArgs const& a, PermuteGroups& p, int begin, int end)
{
    __syncthreads();
    if (threadIdx.x < kWarp)
    {
        warp_exclusive_scan(p.count, p.offset, a.G, threadIdx.x);
    }
    __syncthreads();
    for (int g = threadIdx.x; g <= a.G; g += kPermuteThreads)
    {
        if (blockIdx.x == 0)
        {
            a.group_offset[g] = p.offset[g];
        }
        if (g < a.G)
        {
            if (blockIdx.x == 0)
            {
                a.group_count[g] = p.count[g];
            }
            p.cursor[g] += p.offset[g];
        }
    }
    __syncthreads();
    for (int s = begin + threadIdx.x; s < end; s += kPermuteThreads)
    {
        int const row = atomicAdd(&p.cursor[slot_expert(a, s)], 1);
        a.row_token[row] = s / a.k;
        a.row_weight[row] = a.topk_weights[s];
        a.slot_row[s] = row;
    }
    if (a.has_shared)
    {
        int const slots = a.T * a.k;
        for (int t = blockIdx.x * kPermuteThreads + threadIdx.x; t < a.T; t += gridDim.x * kPermuteThreads)
        {
            a.row_token[slots + t] = t;
            a.row_weight[slots + t] = a.shared_gate[t];
        }
    }
}

// Single CTA: counts per group, then place_slots for every slot.
__global__ void __launch_bounds__(kPermuteThreads) permute_kernel(MoeArgs a)
{
    __shared__ PermuteGroups p;
    int const slots = a.T * a.k;
    pdl_trigger_first();
    for (int g = threadIdx.x; g < a.G; g += kPermuteThreads)
    {
        p.count[g] = (a.has_shared && g == a.E) ? a.T : 0;
        p.cursor[g] = 0;
    }
    __syncthreads();
    count_slots(a, p.count, 0, slots);
    place_slots(a, p, 0, slots);
}

// Several CTAs (QMOE_PERMUTE_CTAS > 1, many slots): CTA b owns the contiguous slot range
// [slots*b/n, slots*(b+1)/n). permute_count_kernel writes each CTA's routed rows per expert;
// permute_place_kernel (same grid) adds them up in every CTA -- group sizes and the rows of earlier
// CTAs in each group -- and place_slots does the rest.
__device__ __forceinline__ int permute_begin(int slots, int b, int n)
{
    return static_cast<int>(static_cast<int64_t>(slots) * b / n);
}

__global__ void __launch_bounds__(kPermuteThreads) permute_count_kernel(MoeArgs a)
{
    __shared__ int s_count[kMaxExperts];
    int const slots = a.T * a.k;
    int const end = permute_begin(slots, blockIdx.x + 1, gridDim.x);
    pdl_trigger_first();
    for (int e = threadIdx.x; e < a.E; e += kPermuteThreads)
    {
        s_count[e] = 0;
    }
    __syncthreads();
    count_slots(a, s_count, permute_begin(slots, blockIdx.x, gridDim.x), end);
    __syncthreads();
    for (int e = threadIdx.x; e < a.E; e += kPermuteThreads)
    {
        a.cta_count[static_cast<int64_t>(blockIdx.x) * a.E + e] = s_count[e];
    }
}

__global__ void __launch_bounds__(kPermuteThreads) permute_place_kernel(MoeArgs a)
{
    __shared__ PermuteGroups p;
    int const slots = a.T * a.k;
    pdl_trigger_first();
    for (int g = threadIdx.x; g < a.G; g += kPermuteThreads)
    {
        int total = 0;
        int before = 0; // rows of group g owned by CTAs < blockIdx.x
        if (a.has_shared && g == a.E)
        {
            total = a.T;
        }
        else
        {
            for (int b = 0; b < static_cast<int>(gridDim.x); ++b)
            {
                int const c = a.cta_count[static_cast<int64_t>(b) * a.E + g];
                total += c;
                before += b < static_cast<int>(blockIdx.x) ? c : 0;
            }
        }
        p.count[g] = total;
        p.cursor[g] = before;
    }
    place_slots(a, p, permute_begin(slots, blockIdx.x, gridDim.x),
        permute_begin(slots, blockIdx.x + 1, gridDim.x));
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
    return launch_kernel(router_logits_kernel<T, kTok, kRows>, grid, dim3(kRouterThreads), smem, stream, a.pdl != 0, a);
}

// Tensor-core router: K splits so that about two CTAs per SM work (few tokens), within the partial
// rows the workspace holds (router_split_cap) and one 64-element K chunk per split at least.
template <typename T, int kMF>
cudaError_t launch_logits_tc(MoeArgs& a, cudaStream_t stream)
{
    int dev = 0;
    int sms = 0;
    cudaError_t const err = current_device_sms(&dev, &sms);
    if (err != cudaSuccess)
    {
        return err;
    }
    dim3 grid(ceil_div(a.T, 16 * kMF), ceil_div(a.E + a.has_shared, kTcRows), 1);
    int64_t const ctas = static_cast<int64_t>(grid.x) * grid.y;
    int64_t const want = (2 * static_cast<int64_t>(sms) + ctas - 1) / ctas;
    a.router_splits = static_cast<int>(
        std::max<int64_t>(1, std::min<int64_t>({want, router_split_cap(a.T), ceil_div(a.H, kTcK)})));
    grid.z = a.router_splits;
    return launch_kernel(router_logits_tc_kernel<T, kMF>, grid, dim3(kTcThreads), 0, stream, a.pdl != 0, a);
}

template <typename T>
cudaError_t launch_router_t(MoeArgs a, RouterOut o, cudaStream_t stream)
{
    a.router_splits = 1;
    cudaError_t err = cudaSuccess;
    if (tuning().router_tc)
    {
        err = a.T <= 16 ? launch_logits_tc<T, 1>(a, stream) : launch_logits_tc<T, 2>(a, stream);
    }
    else
    {
        // 16 staged tokens need 16 * H * 2 bytes of shared memory: up to H = 5120 (160 KB).
        bool const many = a.T >= 64 && a.H <= 5120;
        err = many ? launch_logits<T, 16, 2>(a, stream) : launch_logits<T, kRouterTokens, 1>(a, stream);
    }
    if (err != cudaSuccess)
    {
        return err;
    }
    return launch_kernel(router_topk_kernel<T>, dim3(ceil_div(a.T, kRouterWarps)), dim3(kRouterThreads), 0, stream,
        a.pdl != 0, a, o);
}

} // namespace

cudaError_t launch_router(MoeArgs const& a, int dtype, int32_t* ids, float* weights, float* shared_gate,
    bool last, cudaStream_t stream)
{
    RouterOut const o{ids, weights, shared_gate, last ? 0 : 1};
    return dtype == QMOE_DTYPE_BF16 ? launch_router_t<__nv_bfloat16>(a, o, stream)
                                    : launch_router_t<__half>(a, o, stream);
}

cudaError_t launch_permute(MoeArgs const& a, cudaStream_t stream)
{
    int64_t const slots = static_cast<int64_t>(a.T) * a.k;
    int64_t const ctas = std::min<int64_t>(tuning().permute_ctas, (slots + kPermuteSlotsPerCta - 1) / kPermuteSlotsPerCta);
    if (ctas <= 1)
    {
        return launch_kernel(permute_kernel, dim3(1), dim3(kPermuteThreads), 0, stream, a.pdl != 0, a);
    }
    dim3 const grid(static_cast<unsigned>(ctas));
    cudaError_t const err = launch_kernel(permute_count_kernel, grid, dim3(kPermuteThreads), 0, stream, a.pdl != 0, a);
    return err != cudaSuccess ? err
                              : launch_kernel(permute_place_kernel, grid, dim3(kPermuteThreads), 0, stream, a.pdl != 0, a);
}

} // namespace qmoe
