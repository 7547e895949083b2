// [Experts], decode path: few rows per group, so the layer is bound by reading the weights of the
// experts that were hit. Every weight row of a hit expert is streamed from HBM exactly once with
// 16-byte non-caching loads; a warp owns a few weight rows, each lane multiplies its 8-element
// chunks with the (L1-resident) activation rows of up to kTokChunk tokens, and a warp shuffle sum
// finishes each dot product. Work units (group, block of output columns) of all hit groups form one
// list walked by persistent CTAs, so all SMs stream weights and empty experts cost nothing.
//
//   gate/up unit: 16 intermediate columns (a warp: 2 columns = 2 gate + 2 up rows), fused SwiGLU
//   down unit:    32 hidden rows (a warp: 4 rows), scaled by the row's routing weight
//
// Groups with more than kTokChunk rows loop over token chunks (weights then come again from L2):
// correct for any size, fast only for small ones.
#include "common.cuh"
#include "moe_internal.h"
#include "schedule.cuh"

namespace qmoe
{
namespace
{

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarp;
#ifndef QMOE_GEMV_UNROLL
#define QMOE_GEMV_UNROLL 4 // K steps per loop trip: 16-byte weight loads in flight per lane = 4 * this
#endif
constexpr int kUnroll = QMOE_GEMV_UNROLL;
#ifndef QMOE_GEMV_TOKENS
#define QMOE_GEMV_TOKENS 4 // activation rows per pass over a group's weights
#endif
constexpr int kTokChunk = QMOE_GEMV_TOKENS;
constexpr int kRowsPerWarp = 4;            // weight rows per warp
constexpr int kGateUpColsPerWarp = 2;      // gate/up: 2 columns -> rows gate j, gate j+1, up j, up j+1
constexpr int kGateUpColsPerCta = kGateUpColsPerWarp * kWarps;
constexpr int kDownRowsPerCta = kRowsPerWarp * kWarps;

// Down units of the shared group come in a.shared_splits K-slices (QMOE_DECODE_SPLIT; else 1).
template <bool kGateUp>
__device__ __forceinline__ int units_of_group(MoeArgs const& a, int g)
{
    int const inter = g < a.E ? a.I : a.Is;
    return kGateUp ? ceil_div(inter, kGateUpColsPerCta)
                   : ceil_div(a.H, kDownRowsPerCta) * (g < a.E ? 1 : a.shared_splits);
}

// Work unit b of group g for this warp: its first gate/up column or hidden row c0, the K range
// [k0, k0 + K) it reads, and (down, shared group) the y row block of its K-slice.
struct Unit
{
    int c0, k0, K, slice;
};

template <bool kGateUp>
__device__ __forceinline__ Unit unit_of(MoeArgs const& a, int g, int b, int warp)
{
    if (kGateUp)
    {
        return Unit{b * kGateUpColsPerCta + warp * kGateUpColsPerWarp, 0, a.H, 0};
    }
    bool const routed = g < a.E;
    int const blocks = ceil_div(a.H, kDownRowsPerCta);
    int const K = routed ? a.I : a.Is / a.shared_splits;
    int const slice = routed ? 0 : b / blocks;
    return Unit{(b % blocks) * kDownRowsPerCta + warp * kRowsPerWarp, slice * K, K, slice};
}

// Weight row r (0..kRowsPerWarp) of this warp in unit b of group g, and whether it exists.
// gate/up: r = 0,1 gate of columns c0, c0+1; r = 2,3 up of the same. down: hidden rows c0 + r.
template <typename T, bool kGateUp>
__device__ __forceinline__ T const* weight_row(MoeArgs const& a, int g, int c0, int r, bool* ok)
{
    bool const routed = g < a.E;
    int const inter = routed ? a.I : a.Is;
    if (kGateUp)
    {
        T const* w = routed ? static_cast<T const*>(a.gate_up_w) + static_cast<int64_t>(g) * 2 * a.I * a.H
                            : static_cast<T const*>(a.shared_gate_up_w);
        int const j = c0 + r % kGateUpColsPerWarp;
        *ok = j < inter;
        return w + static_cast<int64_t>((r / kGateUpColsPerWarp) * inter + j) * a.H;
    }
    T const* w = routed ? static_cast<T const*>(a.down_w) + static_cast<int64_t>(g) * a.H * a.I
                        : static_cast<T const*>(a.shared_down_w);
    int const h = c0 + r;
    *ok = h < a.H;
    return w + static_cast<int64_t>(h) * inter;
}

// One work unit (group g, column block b; rows permuted rows from row0) for this warp.
template <typename T, bool kGateUp>
__device__ __forceinline__ void gemv_unit(MoeArgs const& a, int g, int b, int rows, int row0, int warp, int lane)
{
    T const* const x = static_cast<T const*>(a.x);
    T* const act = static_cast<T*>(a.act);
    T* const y = static_cast<T*>(a.y);
    bool const routed = g < a.E;
    int const inter = routed ? a.I : a.Is;
    T* const act_g = act + (routed ? static_cast<int64_t>(row0) * a.I : static_cast<int64_t>(a.T) * a.k * a.I);

    Unit const u = unit_of<kGateUp>(a, g, b, warp);
    int const c0 = u.c0;
    int const K = u.K;
    T const* w_row[kRowsPerWarp];
    bool w_ok[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r)
    {
        w_row[r] = weight_row<T, kGateUp>(a, g, c0, r, &w_ok[r]) + u.k0;
    }
    if (!w_ok[0])
    {
        return; // rows are filled in order: nothing for this warp (no block-level sync in a unit)
    }

    for (int t0 = 0; t0 < rows; t0 += kTokChunk)
    {
        int const mc = min(kTokChunk, rows - t0);
        T const* in_row[kTokChunk];
#pragma unroll
        for (int m = 0; m < kTokChunk; ++m)
        {
            in_row[m] = x;
            if (m < mc)
            {
                // Shared rows are the tokens in order (no read of the permutation: see the kernel).
                int const token = routed ? a.row_token[row0 + t0 + m] : t0 + m;
                in_row[m] = kGateUp ? x + static_cast<int64_t>(token) * a.H
                                    : act_g + static_cast<int64_t>(t0 + m) * inter + u.k0;
            }
        }

        float acc[kRowsPerWarp][kTokChunk] = {};
#pragma unroll(kUnroll)
        for (int k = lane * 8; k < K; k += kWarp * 8)
        {
            float wf[kRowsPerWarp][8];
#pragma unroll
            for (int r = 0; r < kRowsPerWarp; ++r)
            {
                uint4 const v = w_ok[r] ? load_stream16(w_row[r] + k) : make_uint4(0, 0, 0, 0);
                unpack8<T>(v, wf[r]);
            }
#pragma unroll
            for (int m = 0; m < kTokChunk; ++m)
            {
                if (m < mc)
                {
                    float xf[8];
                    unpack8<T>(load_cached16(in_row[m] + k), xf);
#pragma unroll
                    for (int r = 0; r < kRowsPerWarp; ++r)
                    {
#pragma unroll
                        for (int q = 0; q < 8; ++q)
                        {
                            acc[r][m] = fmaf(wf[r][q], xf[q], acc[r][m]);
                        }
                    }
                }
            }
        }

#pragma unroll
        for (int m = 0; m < kTokChunk; ++m)
        {
            if (m < mc)
            {
#pragma unroll
                for (int r = 0; r < kRowsPerWarp; ++r)
                {
                    acc[r][m] = warp_sum(acc[r][m]);
                }
                if (lane == m)
                {
                    if (kGateUp)
                    {
                        T* out = act_g + static_cast<int64_t>(t0 + m) * inter + c0;
#pragma unroll
                        for (int i = 0; i < kGateUpColsPerWarp; ++i)
                        {
                            if (w_ok[i])
                            {
                                out[i] = from_float<T>(silu(acc[i][m]) * acc[kGateUpColsPerWarp + i][m]);
                            }
                        }
                    }
                    else
                    {
                        float const rw = a.row_weight[row0 + t0 + m];
                        // K-slice s of the shared group: y rows T*k + s*T + t (summed by [Combine]).
                        T* out = y + (static_cast<int64_t>(row0) + static_cast<int64_t>(u.slice) * a.T + t0 + m) * a.H + c0;
#pragma unroll
                        for (int r = 0; r < kRowsPerWarp; ++r)
                        {
                            if (w_ok[r])
                            {
                                out[r] = from_float<T>(rw * acc[r][m]);
                            }
                        }
                    }
                }
            }
        }
    }
}

// Persistent CTAs walk units blockIdx.x, +gridDim.x, ... of the list (shared expert first).
// Programmatic dependent launch (pdl_wait, common.cuh):
//   gate/up: the shared expert's units read only x and the weights, so they run before the wait,
//            beside the router, top-k and permutation (those trigger early: common.cuh); the
//            routed units follow the wait.
//   down:    the work list (from the permutation, which completed before the gate/up kernel passed
//            its own wait) is built and each warp's first weight rows are prefetched into L2 before
//            the wait; the activations are read after it.
template <typename T, bool kGateUp>
__global__ void __launch_bounds__(kThreads) grouped_gemv_kernel(MoeArgs a)
{
    __shared__ int s_prefix[kMaxGroups + 1];
    int const warp = threadIdx.x / kWarp;
    int const lane = threadIdx.x % kWarp;
    auto const units = [&](int g) { return a.group_count[g] > 0 ? units_of_group<kGateUp>(a, g) : 0; };

    int unit = blockIdx.x;
    int total = 0;
    if (kGateUp)
    {
        if (a.has_shared) // schedule slot 0: group E, T rows from permuted row T*k (fixed by the layout)
        {
            for (int const shared_units = units_of_group<true>(a, a.E); unit < shared_units; unit += gridDim.x)
            {
                gemv_unit<T, true>(a, a.E, unit, a.T, a.T * a.k, warp, lane);
            }
        }
        pdl_wait();
        pdl_trigger();
        total = build_work_prefix(a, s_prefix, units);
    }
    else
    {
        total = build_work_prefix(a, s_prefix, units);
        if (unit < total)
        {
            int const slot = find_slot(s_prefix, a.G, unit);
            int const g = sched_group(slot, a.G, a.has_shared);
            Unit const u = unit_of<false>(a, g, unit - s_prefix[slot], warp);
#pragma unroll
            for (int r = 0; r < kRowsPerWarp; ++r)
            {
                bool ok = false;
                T const* const w = weight_row<T, false>(a, g, u.c0, r, &ok) + u.k0;
                for (int k = lane * 64; ok && k < u.K; k += kWarp * 64) // 128-byte lines
                {
                    prefetch_l2(w + k);
                }
            }
        }
        pdl_wait();
        pdl_trigger();
    }

    for (; unit < total; unit += gridDim.x)
    {
        int const slot = find_slot(s_prefix, a.G, unit);
        int const g = sched_group(slot, a.G, a.has_shared);
        gemv_unit<T, kGateUp>(a, g, unit - s_prefix[slot], a.group_count[g], a.group_offset[g], warp, lane);
    }
}

template <typename T, bool kGateUp>
cudaError_t launch_gemv(MoeArgs const& a, cudaStream_t stream)
{
    auto kernel = grouped_gemv_kernel<T, kGateUp>;
    int64_t const hit = std::min<int64_t>(a.E, static_cast<int64_t>(a.T) * a.k);
    int64_t const per_routed = kGateUp ? ceil_div(a.I, kGateUpColsPerCta) : ceil_div(a.H, kDownRowsPerCta);
    int64_t const per_shared = kGateUp ? ceil_div(a.Is, kGateUpColsPerCta) : ceil_div(a.H, kDownRowsPerCta) * a.shared_splits;
    int64_t const upper = hit * per_routed + (a.has_shared ? per_shared : 0);
    int grid = 1;
    cudaError_t const err = persistent_grid(kernel, kThreads, 0, upper, &grid);
    if (err != cudaSuccess)
    {
        return err;
    }
    return launch_kernel(kernel, dim3(grid), dim3(kThreads), 0, stream, a.pdl != 0, a);
}

template <typename T>
cudaError_t launch_decode_t(MoeArgs const& a, cudaStream_t stream)
{
    cudaError_t const err = launch_gemv<T, true>(a, stream);
    return err != cudaSuccess ? err : launch_gemv<T, false>(a, stream);
}

} // namespace

cudaError_t launch_experts_decode(MoeArgs const& a, int dtype, cudaStream_t stream)
{
    return dtype == QMOE_DTYPE_BF16 ? launch_decode_t<__nv_bfloat16>(a, stream) : launch_decode_t<__half>(a, stream);
}

} // namespace qmoe
