// [Experts], prefill path: grouped GEMMs on tensor cores (WMMA 16x16x16, bf16/fp16 in, fp32 accumulate).
//
//   gate/up:  act[r, j] = silu(x[tok(r)] . Wg[j]) * (x[tok(r)] . Wu[j])   A rows gathered by token id
//   down:     y[r, h]   = w(r) * (act[r] . Wd[h])
//
// One CTA computes a BM x 128 output tile with a 3-stage cp.async pipeline over K in steps of 32.
// For gate/up the 128 B-tile rows are 64 gate rows and the 64 matching up rows, so SwiGLU is applied
// in the epilogue and only act (not gate/up) reaches memory. Tiles of all groups form one list
// (group-major, n-tile, then m-tile fastest so CTAs running together share a weight tile in L2);
// persistent CTAs walk it. Rows past a group's end and columns past N are zero-filled on load and
// skipped on store; K must be a multiple of 8 (16-byte chunks), checked by the launcher.
#include "common.cuh"
#include "moe_internal.h"
#include "schedule.cuh"

#include <mma.h>

namespace qmoe
{
namespace
{

constexpr int kThreads = 256;
constexpr int kBN = 128;
constexpr int kBK = 32;
constexpr int kStages = 3;
constexpr int kLds = kBK + 8;  // smem row pitch (elements): 80 bytes, conflict-free 16x16 fragment loads
constexpr int kLdc = kBN + 4;  // fp32 epilogue pitch
constexpr int kWarpsM = 2;
constexpr int kWarpsN = 4;
constexpr int kChunksK = kBK / 8; // 16-byte chunks per tile row

// Dynamic shared memory: [tiles: max(pipeline, fp32 epilogue)][work prefix: kMaxGroups + 1 ints].
// The tiles start at offset 0 of the block's shared memory (the kernel has no static shared
// variables), which gives WMMA's loads and stores their 32-byte alignment.
template <int BM>
__host__ __device__ constexpr size_t tc_tile_bytes()
{
    size_t const pipe = size_t(kStages) * (BM + kBN) * kLds * 2;
    size_t const epi = size_t(BM) * kLdc * sizeof(float);
    size_t const bytes = pipe > epi ? pipe : epi;
    return (bytes + 127) / 128 * 128;
}

template <int BM>
__host__ __device__ constexpr size_t tc_smem_bytes()
{
    return tc_tile_bytes<BM>() + sizeof(int) * (kMaxGroups + 1);
}

// N columns of a group's output: intermediate columns for gate/up (each tile covers 64), H for down.
template <bool kGateUp>
__device__ __forceinline__ int group_n_tiles(MoeArgs const& a, int g)
{
    int const inter = g < a.E ? a.I : a.Is;
    return kGateUp ? ceil_div(inter, kBN / 2) : ceil_div(a.H, kBN);
}

template <typename T, int BM, bool kGateUp>
__global__ void __launch_bounds__(kThreads, 2) grouped_gemm_kernel(MoeArgs a)
{
    namespace wmma = nvcuda::wmma;
    constexpr int WM = BM / kWarpsM;
    constexpr int WN = kBN / kWarpsN;
    constexpr int FM = WM / 16;
    constexpr int FN = WN / 16;
    constexpr int kAChunks = BM * kChunksK;
    constexpr int kBChunks = kBN * kChunksK;
    constexpr int kAPer = (kAChunks + kThreads - 1) / kThreads;
    constexpr int kBPer = kBChunks / kThreads;
    static_assert(FM >= 1 && WM % 16 == 0, "BM must be a multiple of 32");
    static_assert(kBChunks % kThreads == 0, "B tile chunks must divide evenly");

    extern __shared__ __align__(128) unsigned char smem[];
    T* const sA = reinterpret_cast<T*>(smem);     // [kStages][BM][kLds]
    T* const sB = sA + kStages * BM * kLds;        // [kStages][kBN][kLds]
    float* const sC = reinterpret_cast<float*>(smem); // [BM][kLdc], reused after the main loop
    int* const s_prefix = reinterpret_cast<int*>(smem + tc_tile_bytes<BM>()); // [kMaxGroups + 1]
    pdl_enter();

    int const total = build_work_prefix(
        a, s_prefix, [&](int g) { return ceil_div(a.group_count[g], BM) * group_n_tiles<kGateUp>(a, g); });
    int const warp = threadIdx.x / kWarp;
    int const wm = warp / kWarpsN;
    int const wn = warp % kWarpsN;
    T const* const x = static_cast<T const*>(a.x);
    T* const act = static_cast<T*>(a.act);

    for (int tile = blockIdx.x; tile < total; tile += gridDim.x)
    {
        int const slot = find_slot(s_prefix, a.G, tile);
        int const g = sched_group(slot, a.G, a.has_shared);
        bool const routed = g < a.E;
        int const rows = a.group_count[g];
        int const row0 = a.group_offset[g];
        int const inter = routed ? a.I : a.Is;
        int const m_tiles = ceil_div(rows, BM);
        int const local = tile - s_prefix[slot];
        int const n_tile = local / m_tiles;
        int const m0 = (local % m_tiles) * BM;
        int const K = kGateUp ? a.H : inter;
        // act rows of this group: routed rows start at row0 * I, shared rows after all routed ones.
        T* const act_g = act + (routed ? static_cast<int64_t>(row0) * a.I : static_cast<int64_t>(a.T) * a.k * a.I);

        T const* a_src[kAPer];
        bool a_ok[kAPer];
#pragma unroll
        for (int i = 0; i < kAPer; ++i)
        {
            int const c = threadIdx.x + i * kThreads;
            int const r = c / kChunksK;
            a_ok[i] = c < kAChunks && m0 + r < rows;
            a_src[i] = x;
            if (a_ok[i])
            {
                a_src[i] = kGateUp ? x + static_cast<int64_t>(a.row_token[row0 + m0 + r]) * a.H
                                   : act_g + static_cast<int64_t>(m0 + r) * inter;
            }
        }
        T const* b_src[kBPer];
        bool b_ok[kBPer];
#pragma unroll
        for (int i = 0; i < kBPer; ++i)
        {
            int const n = (threadIdx.x + i * kThreads) / kChunksK;
            if (kGateUp)
            {
                T const* w = routed ? static_cast<T const*>(a.gate_up_w) + static_cast<int64_t>(g) * 2 * a.I * a.H
                                    : static_cast<T const*>(a.shared_gate_up_w);
                int const j = n_tile * (kBN / 2) + n % (kBN / 2);
                int const half = n / (kBN / 2); // 0: gate rows, 1: up rows
                b_ok[i] = j < inter;
                b_src[i] = w + gate_up_row(j, half, inter, a.gate_up_block) * a.H;
            }
            else
            {
                T const* w = routed ? static_cast<T const*>(a.down_w) + static_cast<int64_t>(g) * a.H * a.I
                                    : static_cast<T const*>(a.shared_down_w);
                int const h = n_tile * kBN + n;
                b_ok[i] = h < a.H;
                b_src[i] = w + static_cast<int64_t>(h) * inter;
            }
        }

        auto load_stage = [&](int stage, int kt) {
            int const k0 = kt * kBK;
#pragma unroll
            for (int i = 0; i < kAPer; ++i)
            {
                int const c = threadIdx.x + i * kThreads;
                if (c < kAChunks)
                {
                    int const r = c / kChunksK;
                    int const k = k0 + (c % kChunksK) * 8;
                    bool const ok = a_ok[i] && k < K;
                    cp_async16(sA + (stage * BM + r) * kLds + (c % kChunksK) * 8, ok ? a_src[i] + k : x, ok);
                }
            }
#pragma unroll
            for (int i = 0; i < kBPer; ++i)
            {
                int const c = threadIdx.x + i * kThreads;
                int const n = c / kChunksK;
                int const k = k0 + (c % kChunksK) * 8;
                bool const ok = b_ok[i] && k < K;
                cp_async16(sB + (stage * kBN + n) * kLds + (c % kChunksK) * 8, ok ? b_src[i] + k : x, ok);
            }
        };

        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[FM][FN];
#pragma unroll
        for (int i = 0; i < FM; ++i)
        {
#pragma unroll
            for (int j = 0; j < FN; ++j)
            {
                wmma::fill_fragment(acc[i][j], 0.0f);
            }
        }

        int const k_tiles = ceil_div(K, kBK);
#pragma unroll
        for (int s = 0; s < kStages - 1; ++s)
        {
            if (s < k_tiles)
            {
                load_stage(s, s);
            }
            cp_async_commit();
        }
        for (int kt = 0; kt < k_tiles; ++kt)
        {
            cp_async_wait<kStages - 2>(); // k-tile kt has landed (for this thread) ...
            __syncthreads();              // ... for all threads, and stage (kt-1)%kStages is free
            int const next = kt + kStages - 1;
            if (next < k_tiles)
            {
                load_stage(next % kStages, next);
            }
            cp_async_commit();

            T const* const a_st = sA + (kt % kStages) * BM * kLds;
            T const* const b_st = sB + (kt % kStages) * kBN * kLds;
#pragma unroll
            for (int kk = 0; kk < kBK; kk += 16)
            {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[FM];
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb[FN];
#pragma unroll
                for (int i = 0; i < FM; ++i)
                {
                    wmma::load_matrix_sync(fa[i], a_st + (wm * WM + i * 16) * kLds + kk, kLds);
                }
#pragma unroll
                for (int j = 0; j < FN; ++j)
                {
                    // B = W^T: element (k, n) sits at W[n][k], i.e. column-major with pitch kLds.
                    wmma::load_matrix_sync(fb[j], b_st + (wn * WN + j * 16) * kLds + kk, kLds);
                }
#pragma unroll
                for (int i = 0; i < FM; ++i)
                {
#pragma unroll
                    for (int j = 0; j < FN; ++j)
                    {
                        wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
                    }
                }
            }
        }
        cp_async_wait<0>();
        __syncthreads(); // every warp is done with the pipeline buffers that sC overlays

#pragma unroll
        for (int i = 0; i < FM; ++i)
        {
#pragma unroll
            for (int j = 0; j < FN; ++j)
            {
                wmma::store_matrix_sync(sC + (wm * WM + i * 16) * kLdc + wn * WN + j * 16, acc[i][j], kLdc,
                    wmma::mem_row_major);
            }
        }
        __syncthreads();

        if (kGateUp)
        {
            // Columns 0..63 are gate, 64..127 the matching up; 8 output columns per thread step.
            int const j0 = n_tile * (kBN / 2);
            for (int idx = threadIdx.x; idx < BM * (kBN / 16); idx += kThreads)
            {
                int const r = idx / (kBN / 16);
                int const c8 = (idx % (kBN / 16)) * 8;
                if (m0 + r < rows && j0 + c8 < inter)
                {
                    float const* gate = sC + r * kLdc + c8;
                    float const* up = gate + kBN / 2;
                    float f[8];
#pragma unroll
                    for (int q = 0; q < 8; ++q)
                    {
                        f[q] = silu(gate[q]) * up[q];
                    }
                    *reinterpret_cast<uint4*>(act_g + static_cast<int64_t>(m0 + r) * inter + j0 + c8) = pack8<T>(f);
                }
            }
        }
        else
        {
            T* const y = static_cast<T*>(a.y);
            int const h0 = n_tile * kBN;
            for (int idx = threadIdx.x; idx < BM * (kBN / 8); idx += kThreads)
            {
                int const r = idx / (kBN / 8);
                int const c8 = (idx % (kBN / 8)) * 8;
                if (m0 + r < rows && h0 + c8 < a.H)
                {
                    float const w = a.row_weight[row0 + m0 + r];
                    float const* c = sC + r * kLdc + c8;
                    float f[8];
#pragma unroll
                    for (int q = 0; q < 8; ++q)
                    {
                        f[q] = w * c[q];
                    }
                    *reinterpret_cast<uint4*>(y + static_cast<int64_t>(row0 + m0 + r) * a.H + h0 + c8) = pack8<T>(f);
                }
            }
        }
        __syncthreads(); // sC is read before the next tile's cp.async overwrites it
    }
}

// Upper bound of the tile count of one GEMM, from host-known sizes only.
template <int BM, bool kGateUp>
int64_t tile_upper_bound(MoeArgs const& a)
{
    int64_t const slots = static_cast<int64_t>(a.T) * a.k;
    int64_t const routed_groups = std::min<int64_t>(a.E, slots);
    int64_t const routed_m = (slots + BM - 1) / BM + routed_groups; // sum of ceil over <= routed_groups groups
    int64_t const n_routed = kGateUp ? ceil_div(a.I, kBN / 2) : ceil_div(a.H, kBN);
    int64_t const n_shared = kGateUp ? ceil_div(a.Is, kBN / 2) : ceil_div(a.H, kBN);
    int64_t const shared_m = a.has_shared ? (a.T + BM - 1) / BM : 0;
    return routed_m * n_routed + shared_m * n_shared;
}

template <typename T, int BM, bool kGateUp>
cudaError_t launch_gemm(MoeArgs const& a, cudaStream_t stream)
{
    auto kernel = grouped_gemm_kernel<T, BM, kGateUp>;
    size_t const smem = tc_smem_bytes<BM>();
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    int grid = 1;
    if (err == cudaSuccess)
    {
        err = persistent_grid(kernel, kThreads, smem, tile_upper_bound<BM, kGateUp>(a), &grid);
    }
    if (err != cudaSuccess)
    {
        return err;
    }
    return launch_kernel(kernel, dim3(grid), dim3(kThreads), smem, stream, a.pdl != 0, a);
}

template <typename T, int BM>
cudaError_t launch_both(MoeArgs const& a, cudaStream_t stream)
{
    cudaError_t err = launch_gemm<T, BM, true>(a, stream);
    return err != cudaSuccess ? err : launch_gemm<T, BM, false>(a, stream);
}

template <typename T>
cudaError_t launch_prefill_t(MoeArgs const& a, cudaStream_t stream)
{
    // Tile height from the mean rows per routed expert: small tiles waste less MMA work on sparse groups.
    int64_t const mean_rows = static_cast<int64_t>(a.T) * a.k / a.E;
    if (mean_rows <= 32)
    {
        return launch_both<T, 32>(a, stream);
    }
    if (mean_rows <= 64)
    {
        return launch_both<T, 64>(a, stream);
    }
    return launch_both<T, 128>(a, stream);
}

} // namespace

cudaError_t launch_experts_prefill(MoeArgs const& a, int dtype, cudaStream_t stream)
{
    return dtype == QMOE_DTYPE_BF16 ? launch_prefill_t<__nv_bfloat16>(a, stream) : launch_prefill_t<__half>(a, stream);
}

} // namespace qmoe
