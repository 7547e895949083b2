// [Experts], decode path: few rows per group, so the layer is bound by reading the weights of the
// experts that were hit. Every weight row of a hit expert is streamed from HBM exactly once with
// 16-byte non-caching loads while the (L1-resident) activation rows are read with cached loads.
// Work units (group, block of output columns) of all hit groups form one list walked by persistent
// CTAs, so all SMs stream weights and empty experts cost nothing. Two inner products:
//
//   FMA (default): a warp owns 4 weight rows; each lane multiplies its 8-element chunks with up to
//     kTokChunk activation rows on the CUDA cores and a warp shuffle sum finishes each dot product.
//       gate/up unit: 16 intermediate columns (a warp: 2 columns = 2 gate + 2 up rows), fused SwiGLU
//       down unit:    32 hidden rows (a warp: 4 rows), scaled by the row's routing weight
//     Groups with more than kTokChunk rows loop over token chunks (weights then come again from L2).
//   MMA (QMOE_DECODE_MMA=n): a warp owns 16 weight rows and multiplies them with up to 64
//     activation rows per pass on the tensor cores (mma.sync m16n8k16, fp32 accumulate), so a group
//     of up to 64 rows reads its weights once; see mma_unit.
//       gate/up unit: 64 intermediate columns (a warp: 8 columns = 8 gate + 8 up rows), fused SwiGLU
//       down unit:    128 hidden rows (a warp: 16 rows)
// With shared_splits > 1 the shared group's down units come in K-slices (QMOE_DECODE_SPLIT, MMA).
#include "common.cuh"
#include "moe_internal.h"
#include "schedule.cuh"

#include <type_traits>

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

// Rows a warp owns: gate/up kCols columns (rows gate c0..c0+kCols-1, then up of the same columns),
// down kRows hidden rows.
template <bool kMma>
struct Shape
{
    static constexpr int kRows = kMma ? 16 : 4;
    static constexpr int kCols = kRows / 2;
    static constexpr int kColsPerCta = kCols * kWarps;
    static constexpr int kRowsPerCta = kRows * kWarps;
};

// MMA path: activation rows per pass (8 per n-tile of the m16n8k16 product) and K steps of 32
// columns per loop trip (mma_pass).
constexpr int kMmaTokens = 64;
constexpr int kMmaNTiles = kMmaTokens / 8;
constexpr int kMmaSteps = 2;
constexpr int kMmaMinCtasPerSm = 2; // 128 registers: 16 warps per SM keep 32-64 KB of weights in flight
// PDL: weight bytes of its first unit each down warp asks L2 for before waiting (a routed unit of
// the CUDA-core kernel at the 57B dims: 4 rows x 2560 x 2 bytes).
constexpr int kPrefetchBytesPerWarp = 20 * 1024;

// Down units of the shared group come in a.shared_splits K-slices (QMOE_DECODE_SPLIT, MMA; else 1).
template <bool kGateUp, bool kMma>
__device__ __forceinline__ int units_of_group(MoeArgs const& a, int g)
{
    using S = Shape<kMma>;
    int const inter = g < a.E ? a.I : a.Is;
    return kGateUp ? ceil_div(inter, S::kColsPerCta)
                   : ceil_div(a.H, S::kRowsPerCta) * (g < a.E ? 1 : a.shared_splits);
}

// Work unit b of group g for this warp: its first gate/up column or hidden row c0, the K range
// [k0, k0 + K) it reads, and (down, shared group) the y row block of its K-slice.
struct Unit
{
    int c0, k0, K, slice;
};

template <bool kGateUp, bool kMma>
__device__ __forceinline__ Unit unit_of(MoeArgs const& a, int g, int b, int warp)
{
    using S = Shape<kMma>;
    if (kGateUp)
    {
        return Unit{b * S::kColsPerCta + warp * S::kCols, 0, a.H, 0};
    }
    bool const routed = g < a.E;
    int const blocks = ceil_div(a.H, S::kRowsPerCta);
    int const K = routed ? a.I : a.Is / a.shared_splits;
    int const slice = routed ? 0 : b / blocks;
    return Unit{(b % blocks) * S::kRowsPerCta + warp * S::kRows, slice * K, K, slice};
}

// Weight row r (0..kRows) of this warp in unit b of group g, and whether it exists.
// gate/up: r < kCols gate of column c0 + r, else up of column c0 + r - kCols. down: hidden row c0 + r.
template <typename T, bool kGateUp, bool kMma>
__device__ __forceinline__ T const* weight_row(MoeArgs const& a, int g, int c0, int r, bool* ok)
{
    using S = Shape<kMma>;
    bool const routed = g < a.E;
    int const inter = routed ? a.I : a.Is;
    if (kGateUp)
    {
        T const* w = routed ? static_cast<T const*>(a.gate_up_w) + static_cast<int64_t>(g) * 2 * a.I * a.H
                            : static_cast<T const*>(a.shared_gate_up_w);
        int const j = c0 + r % S::kCols;
        *ok = j < inter;
        return w + gate_up_row(j, r / S::kCols, inter, a.gate_up_block) * a.H;
    }
    T const* w = routed ? static_cast<T const*>(a.down_w) + static_cast<int64_t>(g) * a.H * a.I
                        : static_cast<T const*>(a.shared_down_w);
    int const h = c0 + r;
    *ok = h < a.H;
    return w + static_cast<int64_t>(h) * inter;
}

// One work unit (group g, column block b; rows permuted rows from row0) for this warp, FMA path.
template <typename T, bool kGateUp>
__device__ __forceinline__ void gemv_unit(MoeArgs const& a, int g, int b, int rows, int row0, int warp, int lane)
{
    T const* const x = static_cast<T const*>(a.x);
    T* const act = static_cast<T*>(a.act);
    T* const y = static_cast<T*>(a.y);
    bool const routed = g < a.E;
    int const inter = routed ? a.I : a.Is;
    T* const act_g = act + (routed ? static_cast<int64_t>(row0) * a.I : static_cast<int64_t>(a.T) * a.k * a.I);

    constexpr int kRowsPerWarp = Shape<false>::kRows;
    constexpr int kGateUpColsPerWarp = Shape<false>::kCols;
    Unit const u = unit_of<kGateUp, false>(a, g, b, warp);
    int const c0 = u.c0;
    int const K = u.K;
    T const* w_row[kRowsPerWarp];
    bool w_ok[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r)
    {
        w_row[r] = weight_row<T, kGateUp, false>(a, g, c0, r, &w_ok[r]) + u.k0;
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

// d += a * b for one m16n8k16 tile (A 16x16 row-major, B 16x8 column-major, fp32 accumulators):
// PTX ISA "Matrix fragments for mma.m16n8k16". Lane l = 4 * gid + tig holds
//   a = {A[gid][2tig..+1], A[gid+8][2tig..+1], A[gid][2tig+8..+9], A[gid+8][2tig+8..+9]}
//   b = {B[2tig..+1][gid], B[2tig+8..+9][gid]},  d = {D[gid][2tig..+1], D[gid+8][2tig..+1]}
// (each register two 16-bit values, the lower column/row index in the low half).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
    uint32_t b0, uint32_t b1)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if constexpr (std::is_same<T, __nv_bfloat16>::value)
    {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    }
    else
    {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    }
#else
    // The host launches this path on compute capability 8.0+ only; reaching here means a build
    // without 8.0+ code JIT-compiled for such a device: fail loudly rather than return zeros.
    (void) d, (void) a0, (void) a1, (void) a2, (void) a3, (void) b0, (void) b1;
    __trap();
#endif
}

// What one warp's MMA unit works on (mma_unit), for its passes over up to 64 activation rows.
template <typename T>
struct MmaWarp
{
    T const* w_lo; // weight row gid of the warp's 16, at the unit's first K column
    T const* w_hi; // weight row gid + 8
    bool ok_lo, ok_hi;
    T* act_g; // the group's act rows
    int inter;
    Unit u;
    int gid, tig;
};

// One pass: activation rows [t0, t0 + 8 NT) of the group (those >= rows read as zero, not written).
// NT (n-tiles) is a template argument so that a pass over few rows keeps few accumulators live.
template <typename T, bool kGateUp, int NT>
__device__ __forceinline__ void mma_pass(
    MoeArgs const& a, MmaWarp<T> const& w, bool routed, int rows, int row0, int t0)
{
    T const* const x = static_cast<T const*>(a.x);
    T* const y = static_cast<T*>(a.y);
    int const K = w.u.K;
    uint4 const zero = make_uint4(0, 0, 0, 0);
    // Activation row of each n-tile for this lane (x row by token, or act row), -1 past the group.
    int in_row[NT];
#pragma unroll
    for (int j = 0; j < NT; ++j)
    {
        int const m = t0 + 8 * j + w.gid;
        // Shared rows are the tokens in order (no read of the permutation: see the kernel).
        in_row[j] = m >= rows ? -1 : (kGateUp && routed ? a.row_token[row0 + m] : m);
    }
    T const* const in_base = kGateUp ? x : w.act_g + w.u.k0;
    int64_t const in_stride = kGateUp ? a.H : w.inter;

    // K steps per loop trip (32 columns each). The weights of the next trip are loaded before the
    // math of this one, so 2 * 2 * kSteps 16-byte loads per lane are in flight (more spill at 128
    // registers: nvcc 13.0 hoists the activation loads of a whole trip).
    constexpr int kSteps = kMmaSteps;
    uint4 wl[kSteps];
    uint4 wh[kSteps];
    auto const load_weights = [&](int kb) {
#pragma unroll
        for (int s = 0; s < kSteps; ++s)
        {
            int const k = kb + 32 * s + 8 * w.tig; // K is a multiple of 8: k < K means all 8 are in range
            wl[s] = w.ok_lo && k < K ? load_stream16(w.w_lo + k) : zero;
            wh[s] = w.ok_hi && k < K ? load_stream16(w.w_hi + k) : zero;
        }
    };
    float acc[NT][4] = {};
    load_weights(0);
    for (int kb = 0; kb < K; kb += 32 * kSteps) // trip count warp-uniform (mma.sync needs the whole warp)
    {
        uint4 cl[kSteps];
        uint4 ch[kSteps];
#pragma unroll
        for (int s = 0; s < kSteps; ++s)
        {
            cl[s] = wl[s];
            ch[s] = wh[s];
        }
        load_weights(kb + 32 * kSteps); // past K: no loads (predicated off)
#pragma unroll
        for (int s = 0; s < kSteps; ++s)
        {
            int const k = kb + 32 * s + 8 * w.tig;
#pragma unroll
            for (int j = 0; j < NT; ++j)
            {
                uint4 const xv
                    = in_row[j] >= 0 && k < K ? load_cached16(in_base + in_row[j] * in_stride + k) : zero;
                mma_16816<T>(acc[j], cl[s].x, ch[s].x, cl[s].y, ch[s].y, xv.x, xv.y);
                mma_16816<T>(acc[j], cl[s].z, ch[s].z, cl[s].w, ch[s].w, xv.z, xv.w);
            }
        }
    }

#pragma unroll
    for (int j = 0; j < NT; ++j)
    {
#pragma unroll
        for (int e = 0; e < 2; ++e)
        {
            int const m = t0 + 8 * j + 2 * w.tig + e;
            if (m >= rows)
            {
                continue;
            }
            if (kGateUp)
            {
                if (w.ok_lo)
                {
                    w.act_g[static_cast<int64_t>(m) * w.inter + w.u.c0 + w.gid]
                        = from_float<T>(silu(acc[j][e]) * acc[j][2 + e]);
                }
            }
            else
            {
                float const rw = a.row_weight[row0 + m];
                // K-slice s of the shared group: y rows T*k + s*T + t (summed by [Combine]).
                T* const out
                    = y + (static_cast<int64_t>(row0) + static_cast<int64_t>(w.u.slice) * a.T + m) * a.H + w.u.c0;
                if (w.ok_lo)
                {
                    out[w.gid] = from_float<T>(rw * acc[j][e]);
                }
                if (w.ok_hi)
                {
                    out[w.gid + 8] = from_float<T>(rw * acc[j][2 + e]);
                }
            }
        }
    }
}

// One work unit for this warp, MMA path: A = the warp's 16 weight rows, B = 8 activation rows per
// n-tile, up to kMmaNTiles n-tiles per pass. The dot products run over K in any order, so each lane
// loads contiguous 16 bytes instead of the fragment's scattered pairs: in a K step of 32 columns
// from kb, lane (gid, tig) loads columns kb + 8 tig .. + 7 of weight rows gid and gid + 8 and of
// activation row gid of every n-tile. Elements 0-3 of those vectors feed one mma as the fragment
// columns {2tig, 2tig+1, 2tig+8, 2tig+9}, elements 4-7 a second one; A and B map fragment column
// to memory column alike, so each pair of mmas adds exactly the 32 products of the step.
// The accumulators then hold, per n-tile j, rows gid and gid + 8 for activation rows
// 8j + 2tig and 8j + 2tig + 1: gate and up of one column in the same lane (gate/up), two hidden
// rows (down).
template <typename T, bool kGateUp>
__device__ __forceinline__ void mma_unit(MoeArgs const& a, int g, int b, int rows, int row0, int warp, int lane)
{
    bool const routed = g < a.E;
    MmaWarp<T> w{};
    w.u = unit_of<kGateUp, true>(a, g, b, warp);
    bool ok0 = false; // row 0 of the warp (warp-uniform): rows are filled in order
    (void) weight_row<T, kGateUp, true>(a, g, w.u.c0, 0, &ok0);
    if (!ok0)
    {
        return; // nothing for this warp (no block-level sync in a unit; the whole warp leaves)
    }
    w.gid = lane / 4;
    w.tig = lane % 4;
    w.w_lo = weight_row<T, kGateUp, true>(a, g, w.u.c0, w.gid, &w.ok_lo) + w.u.k0;
    w.w_hi = weight_row<T, kGateUp, true>(a, g, w.u.c0, w.gid + 8, &w.ok_hi) + w.u.k0;
    w.inter = routed ? a.I : a.Is;
    w.act_g = static_cast<T*>(a.act) + (routed ? static_cast<int64_t>(row0) * a.I : static_cast<int64_t>(a.T) * a.k * a.I);
    for (int t0 = 0; t0 < rows; t0 += kMmaTokens)
    {
        int const n_tiles = ceil_div(min(kMmaTokens, rows - t0), 8); // warp-uniform
        if (n_tiles == 1)
        {
            mma_pass<T, kGateUp, 1>(a, w, routed, rows, row0, t0);
        }
        else if (n_tiles == 2)
        {
            mma_pass<T, kGateUp, 2>(a, w, routed, rows, row0, t0);
        }
        else if (n_tiles <= 4)
        {
            mma_pass<T, kGateUp, 4>(a, w, routed, rows, row0, t0);
        }
        else
        {
            mma_pass<T, kGateUp, kMmaNTiles>(a, w, routed, rows, row0, t0);
        }
    }
}

template <typename T, bool kGateUp, bool kMma>
__device__ __forceinline__ void run_unit(MoeArgs const& a, int g, int b, int rows, int row0, int warp, int lane)
{
    if (kMma)
    {
        mma_unit<T, kGateUp>(a, g, b, rows, row0, warp, lane);
    }
    else
    {
        gemv_unit<T, kGateUp>(a, g, b, rows, row0, warp, lane);
    }
}

// Persistent CTAs walk units blockIdx.x, +gridDim.x, ... of the list (shared expert first).
// Programmatic dependent launch (pdl_wait, common.cuh):
//   gate/up: the shared expert's units read only x and the weights, so they run before the wait,
//            beside the router, top-k and permutation (those trigger early: common.cuh); the
//            routed units follow the wait.
//   down:    the work list (from the permutation, which completed before the gate/up kernel passed
//            its own wait) is built and the start of each warp's first weight rows is prefetched
//            into L2 before the wait; the activations are read after it.
template <typename T, bool kGateUp, bool kMma>
__device__ __forceinline__ void grouped_units(MoeArgs const& a)
{
    __shared__ int s_prefix[kMaxGroups + 1];
    int const warp = threadIdx.x / kWarp;
    int const lane = threadIdx.x % kWarp;
    auto const units = [&](int g) { return a.group_count[g] > 0 ? units_of_group<kGateUp, kMma>(a, g) : 0; };

    int unit = blockIdx.x;
    int total = 0;
    if (kGateUp)
    {
        if (a.has_shared) // schedule slot 0: group E, T rows from permuted row T*k (fixed by the layout)
        {
            for (int const shared_units = units_of_group<true, kMma>(a, a.E); unit < shared_units; unit += gridDim.x)
            {
                run_unit<T, true, kMma>(a, a.E, unit, a.T, a.T * a.k, warp, lane);
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
            Unit const u = unit_of<false, kMma>(a, g, unit - s_prefix[slot], warp);
            // The first columns of each row, at most kPrefetchBytesPerWarp per warp: every CTA of the
            // grid does this, and the sum must fit in L2 (H100: 50 MB; 2 CTAs x 132 SMs x 8 warps
            // x 20 KB = 42 MB), or the first lines are evicted before they are used.
            int const cols = min(u.K, kPrefetchBytesPerWarp / static_cast<int>(sizeof(T)) / Shape<kMma>::kRows);
#pragma unroll
            for (int r = 0; r < Shape<kMma>::kRows; ++r)
            {
                bool ok = false;
                T const* const w = weight_row<T, false, kMma>(a, g, u.c0, r, &ok) + u.k0;
                for (int k = lane * 64; ok && k < cols; k += kWarp * 64) // 128-byte lines
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
        run_unit<T, kGateUp, kMma>(a, g, unit - s_prefix[slot], a.group_count[g], a.group_offset[g], warp, lane);
    }
}

template <typename T, bool kGateUp>
__global__ void __launch_bounds__(kThreads) grouped_gemv_kernel(MoeArgs a)
{
    grouped_units<T, kGateUp, false>(a);
}

template <typename T, bool kGateUp>
__global__ void __launch_bounds__(kThreads, kMmaMinCtasPerSm) grouped_mma_kernel(MoeArgs a)
{
    grouped_units<T, kGateUp, true>(a);
}

template <typename T, bool kGateUp, bool kMma>
cudaError_t launch_gemv(MoeArgs const& a, cudaStream_t stream)
{
    using S = Shape<kMma>;
    auto kernel = kMma ? grouped_mma_kernel<T, kGateUp> : grouped_gemv_kernel<T, kGateUp>;
    int64_t const hit = std::min<int64_t>(a.E, static_cast<int64_t>(a.T) * a.k);
    int64_t const per_routed = kGateUp ? ceil_div(a.I, S::kColsPerCta) : ceil_div(a.H, S::kRowsPerCta);
    int64_t const per_shared
        = kGateUp ? ceil_div(a.Is, S::kColsPerCta) : ceil_div(a.H, S::kRowsPerCta) * a.shared_splits;
    int64_t const upper = hit * per_routed + (a.has_shared ? per_shared : 0);
    int grid = 1;
    cudaError_t const err = persistent_grid(kernel, kThreads, 0, upper, &grid);
    if (err != cudaSuccess)
    {
        return err;
    }
    return launch_kernel(kernel, dim3(grid), dim3(kThreads), 0, stream, a.pdl != 0, a);
}

template <typename T, bool kMma>
cudaError_t launch_decode_t(MoeArgs const& a, cudaStream_t stream)
{
    cudaError_t const err = launch_gemv<T, true, kMma>(a, stream);
    return err != cudaSuccess ? err : launch_gemv<T, false, kMma>(a, stream);
}

} // namespace

cudaError_t launch_experts_decode(MoeArgs const& a, int dtype, bool mma, cudaStream_t stream)
{
    if (dtype == QMOE_DTYPE_BF16)
    {
        return mma ? launch_decode_t<__nv_bfloat16, true>(a, stream) : launch_decode_t<__nv_bfloat16, false>(a, stream);
    }
    return mma ? launch_decode_t<__half, true>(a, stream) : launch_decode_t<__half, false>(a, stream);
}

} // namespace qmoe
