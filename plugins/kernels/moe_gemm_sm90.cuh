// [Experts], prefill path on Hopper (sm_90a): CUTLASS 3 pointer-array grouped GEMMs (TMA loads,
// warp-specialized wgmma, persistent group tile scheduler), bf16/fp16 in, fp32 accumulate.
//
//   gather   xg[r] = x[tok(r)] for the routed rows r < T*k (into the y region, which is free until
//            the down GEMM writes it); the shared group reads x itself.
//   GEMM 1   gu[r, 0:2N] = A_g[r] . W_gu[g]^T            N = I (routed) or Is (shared)
//   SwiGLU   gu[r, 0:N] = w(r) * silu(gu[r, 0:N]) * gu[r, N:2N]     in place, row pitch stays 2N
//   GEMM 2   y[r] = gu[r, 0:N] . W_down[g]^T              A pitch 2N
//
// The routing weight is folded into the activation (down_proj is linear), so [Combine] only sums.
// Per-group problem shapes, pointers and strides are written on the device by setup_kernel from the
// permutation's group counts: groups without rows are M = 0 problems (N = 0 swapped) and get no
// tiles. The shared expert is scheduled first (or, with QMOE_SHARED_INTERLEAVE, in pieces spread
// among the routed experts), and for T <= 512 its down projection is split along K (see
// setup_kernel). With QMOE_SWAP_AB the weights are the GEMMs' M operand for few rows per group
// (SwapTiles), with QMOE_GEMM_PDL they launch early behind griddepcontrol.wait (pdl_gemm_kernel),
// with QMOE_SKIP_PAD a 128-row tile's warp group of padding rows does no math (PadSkippingMainloop).
// Host code never reads a device value, so the whole layer stays asynchronous and CUDA-graph
// capturable.
//
// Built only when CMake finds CUTLASS (QMOE_CUTLASS_INCLUDE_DIR, from the nvidia-cutlass package);
// moe_gemm_tc.cu (WMMA) is the prefill path everywhere else (A100, or no CUTLASS). Included once
// per dtype by moe_gemm_sm90_{bf16,fp16}.cu, so the two heavy instantiations compile in parallel.
#pragma once

#include "common.cuh"
#include "moe_internal.h"

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"


namespace qmoe
{
namespace
{

using namespace cute;
using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>; // <M, N, K> per group

// Tile configurations. Small: few rows per expert (memory-bound; 64-row tiles, two consumer warp
// groups ping-pong on different tiles). Large: compute-bound prefill (cooperative tiles). The
// QMOE_SM90_* macros exist to benchmark other shapes (scripts/gpu_check.sh VARIANTS).
#ifndef QMOE_SM90_SMALL_TILE_N
#define QMOE_SM90_SMALL_TILE_N 256
#endif
#ifndef QMOE_SM90_SMALL_TILE_K
#define QMOE_SM90_SMALL_TILE_K 64 // 128: each weight row segment of a TMA box is 256 bytes, not 128
#endif
#ifndef QMOE_SM90_LARGE_TILE_K
#define QMOE_SM90_LARGE_TILE_K 64
#endif
#ifndef QMOE_SM90_LARGE_TILE_M
#define QMOE_SM90_LARGE_TILE_M 128
#endif
#ifndef QMOE_SM90_LARGE_TILE_N
#define QMOE_SM90_LARGE_TILE_N 256
#endif
#ifndef QMOE_SM90_LARGE_CLUSTER_M
#define QMOE_SM90_LARGE_CLUSTER_M 1
#endif
#ifndef QMOE_SM90_LARGE_CLUSTER_N
#define QMOE_SM90_LARGE_CLUSTER_N 1
#endif

struct SmallTiles
{
    static constexpr bool kSwap = false;
    static constexpr bool kSwiglu = false;
    using Kernel = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong;
    using Epilogue = cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong;
    using Tile = Shape<_64, Int<QMOE_SM90_SMALL_TILE_N>, Int<QMOE_SM90_SMALL_TILE_K>>;
    using Cluster = Shape<_1, _1, _1>;
};

// QMOE_SM90_LARGE_PINGPONG=1: the large tiles ping-pong too (each consumer warp group owns a whole
// tile and its epilogue overlaps the other's math), e.g. with QMOE_SM90_LARGE_TILE_N=128.
#ifndef QMOE_SM90_LARGE_PINGPONG
#define QMOE_SM90_LARGE_PINGPONG 0
#endif

struct LargeTiles
{
    static constexpr bool kSwap = false;
    static constexpr bool kSwiglu = false;
#if QMOE_SM90_LARGE_PINGPONG
    using Kernel = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong;
    using Epilogue = cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong;
#else
    using Kernel = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
    using Epilogue = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
#endif
    using Tile = Shape<Int<QMOE_SM90_LARGE_TILE_M>, Int<QMOE_SM90_LARGE_TILE_N>, Int<QMOE_SM90_LARGE_TILE_K>>;
    using Cluster = Shape<Int<QMOE_SM90_LARGE_CLUSTER_M>, Int<QMOE_SM90_LARGE_CLUSTER_N>, _1>;
};

// QMOE_SWAP_AB: swapped operands for few rows per group (TensorRT-LLM's and vLLM's CUTLASS MoE GEMMs
// do the same for small batches). The weights are the M operand, in 128-row cooperative tiles; the
// group's rows are N, in tiles of N rows: D^T[w, r] = W[w] . A[r], written column-major, which is
// D[r, w] row-major (the same output buffers and pitches). wgmma's N may be any multiple of 8 up to
// 256, so a tile pads a group's rows to a multiple of N instead of 64 or 128 rows, and each tile
// streams a 128-row weight slice (0.9 MB at K = 3584) instead of 256 rows. Two widths: narrow for
// decode-like sizes (57B: up to 96 tokens; the shared group's T rows take ceil(T / N) tiles, which
// the AlongN raster order hands to neighbouring CTAs at the same time, so its weight tile comes
// from HBM once and from L2 for the others), wide up to QMOE_SWAP_AB's mean rows (57B 512 tokens: 64
// mean routed rows, standard deviation 8, so one 80-row tile for all but ~2% of the experts: 1.25x
// the rows in tile math instead of 2x).
#ifndef QMOE_SM90_SWAP_NARROW_N
#define QMOE_SM90_SWAP_NARROW_N 32
#endif
#ifndef QMOE_SM90_SWAP_WIDE_N
#define QMOE_SM90_SWAP_WIDE_N 80
#endif

template <int N>
struct SwapTiles
{
    static constexpr bool kSwap = true;
    static constexpr bool kSwiglu = false;
    using Kernel = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
    using Epilogue = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
    using Tile = Shape<_128, Int<N>, _64>;
    using Cluster = Shape<_1, _1, _1>;
};
using SwapNarrowTiles = SwapTiles<QMOE_SM90_SWAP_NARROW_N>;
using SwapWideTiles = SwapTiles<QMOE_SM90_SWAP_WIDE_N>;

// Weights in QMOE_GATE_UP_FUSED_BLOCK blocks (qmoe_moe_params.gate_up_block): GEMM 1 with SwiGLU in
// its epilogue (SwigluEpilogue), in Base's tiles and kernel but always 256 columns wide, so that a
// tile holds gate and up of the same 128 intermediate columns. GEMM 2 is unchanged (Base).
template <typename Base>
struct Fused : Base
{
    static constexpr bool kSwiglu = true;
    using Tile = Shape<decltype(size<0>(typename Base::Tile{})), Int<2 * QMOE_GATE_UP_FUSED_BLOCK>,
        decltype(size<2>(typename Base::Tile{}))>;
};

template <typename T>
struct CutlassType;
template <>
struct CutlassType<__nv_bfloat16>
{
    using type = cutlass::bfloat16_t;
};
template <>
struct CutlassType<__half>
{
    using type = cutlass::half_t;
};

// GEMM 1's epilogue for weights in QMOE_GATE_UP_FUSED_BLOCK blocks: instead of the tile's 256
// gate/up columns it writes h[r, j] = s(r) * silu(gate[r, j]) * up[r, j] for its 128 intermediate
// columns j, straight from the fp32 accumulators (no bf16 rounding of gate and up in between), with
// s(r) the row's routing weight (shared rows: the shared expert's gate, or 1 when the side stream
// runs its GEMM 1 before the router: then [Combine] applies the gate), into row r of D from
// column 0: the separate SwiGLU pass and its 3 x 2 bytes per element of traffic go away, and GEMM 1
// writes half the bytes. A CUTLASS collective epilogue without shared memory, in the shape of
// CUTLASS's DefaultEpilogueArray (the kernels run it through Sm90TmaWarpSpecializedAdapter, as
// CUTLASS's builder does for PtrArrayNoSmemWarpSpecialized), so each thread stores from registers:
// wgmma's accumulator fragment of an M x 256 tile holds, per thread, values
// ((2 adjacent columns, rows r and r + 8, 32 column groups of 8), M / 64 row blocks, 1): gate column
// c (group c / 8 < 16) and up column c (group c / 8 + 16) sit in the same thread.
template <typename T>
class SwigluEpilogue
{
public:
    using E = typename CutlassType<T>::type;
    using EpilogueSchedule = cutlass::epilogue::PtrArrayNoSmemWarpSpecialized;
    using DispatchPolicy = EpilogueSchedule;
    // Names the element types for GemmUniversalAdapter; never called.
    using ThreadEpilogueOp = cutlass::epilogue::thread::LinearCombination<E, 1, float, float>;
    using ElementOutput = E;
    using ElementAccumulator = float;
    using ElementCompute = float;
    using ElementScalar = float;
    using ElementC = E; // C is never read
    using ElementD = E;
    using InternalStrideC = cute::Stride<int64_t, cute::Int<1>, cute::Int<0>>;
    using InternalStrideD = InternalStrideC;
    using StrideC = InternalStrideC*;
    using StrideD = InternalStrideD*;
    using GmemTiledCopyC = void;
    using GmemTiledCopyD = void;
    static constexpr int kBlock = QMOE_GATE_UP_FUSED_BLOCK;

    struct SharedStorage
    {
    };
    using TensorMapStorage = SharedStorage;

    struct Arguments
    {
        E** ptr_D = nullptr;                   // per group: h row 0, column 0
        InternalStrideD const* dD = nullptr;   // per group: h's row pitch
        float const* const* scale = nullptr;   // per group: s of its rows
    };
    using Params = Arguments;

    template <class ProblemShape>
    static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args, void*)
    {
        return args;
    }

    template <class ProblemShape>
    static size_t get_workspace_size(ProblemShape const&, Arguments const&, int)
    {
        return 0;
    }

    template <class ProblemShape>
    static cutlass::Status initialize_workspace(
        ProblemShape const&, Arguments const&, void*, cudaStream_t, cutlass::CudaHostAdapter* = nullptr)
    {
        return cutlass::Status::kSuccess;
    }

    template <class ProblemShape>
    static bool can_implement(ProblemShape const&, Arguments const& args)
    {
        return args.ptr_D != nullptr && args.dD != nullptr && args.scale != nullptr;
    }

    CUTLASS_HOST_DEVICE SwigluEpilogue(Params const& params)
        : params_(params)
    {
    }

    CUTLASS_DEVICE bool is_source_needed()
    {
        return false;
    }

    // The problem's N counts the stored gate/up rows of the entry (2x its intermediate columns);
    // block coordinate n covers intermediate columns [n * 128, n * 128 + 128).
    template <class ProblemShapeMNKL, class BlockShapeMNK, class BlockCoordMNKL, class FrgEngine, class FrgLayout,
        class TiledMma, class ResidueMNK>
    CUTLASS_DEVICE void operator()(ProblemShapeMNKL problem_shape_mnkl, BlockShapeMNK blk_shape_mnk,
        BlockCoordMNKL blk_coord_mnkl, cute::Tensor<FrgEngine, FrgLayout> const& acc, TiledMma tiled_mma, ResidueMNK,
        int thread_idx, char*)
    {
        using namespace cute;
        constexpr int kTileM = size<0>(BlockShapeMNK{});
        constexpr int kTileN = size<1>(BlockShapeMNK{});
        static_assert(kTileN == 2 * kBlock, "a tile holds one gate block and its up block");
        static_assert(rank(FrgLayout{}) == 3 && rank<0>(FrgLayout{}) == 3, "wgmma accumulator fragment");
        static_assert(size<0, 0>(FrgLayout{}) == 2 && size<0, 1>(FrgLayout{}) == 2
                && size<0, 2>(FrgLayout{}) * 8 == kTileN && size<2>(FrgLayout{}) == 1,
            "one wgmma atom spans the tile's 256 columns: (2 columns, 2 rows, 32 groups of 8 columns)");
        constexpr int kGroups = size<0, 2>(FrgLayout{});
        int const M = get<0>(problem_shape_mnkl);
        int const out_n = get<1>(problem_shape_mnkl) / 2;
        int const m_coord = static_cast<int>(get<0>(blk_coord_mnkl));
        int const n_coord = static_cast<int>(get<1>(blk_coord_mnkl));
        int const l = static_cast<int>(get<3>(blk_coord_mnkl));
        int64_t const ld = get<0>(params_.dD[l]);
        T* const d = reinterpret_cast<T*>(params_.ptr_D[l]);
        float const* const scale = params_.scale[l]; // nullptr: s = 1 (a.shared_unscaled)
        // Tile-local (row, column) of each accumulator value of this thread.
        Tensor const coords = tiled_mma.get_thread_slice(thread_idx)
                                  .partition_C(make_identity_tensor(make_shape(Int<kTileM>{}, Int<kTileN>{})));
        int const row0 = m_coord * kTileM;
        int const col0 = n_coord * kBlock;
        CUTLASS_PRAGMA_UNROLL
        for (int mi = 0; mi < size<1>(FrgLayout{}); ++mi)
        {
            CUTLASS_PRAGMA_UNROLL
            for (int r = 0; r < 2; ++r)
            {
                int const m = row0 + get<0>(coords(make_coord(make_coord(0, r, 0), mi, 0)));
                if (m >= M)
                {
                    continue;
                }
                float const s = scale != nullptr ? scale[m] : 1.0f;
                T* const d_row = d + m * ld;
                CUTLASS_PRAGMA_UNROLL
                for (int grp = 0; grp < kGroups / 2; ++grp)
                {
                    int const j = col0 + get<1>(coords(make_coord(make_coord(0, r, grp), mi, 0))); // even
                    if (j < out_n) // out_n is a multiple of 8, so j + 1 < out_n too
                    {
                        float const g0 = acc(make_coord(make_coord(0, r, grp), mi, 0));
                        float const g1 = acc(make_coord(make_coord(1, r, grp), mi, 0));
                        float const u0 = acc(make_coord(make_coord(0, r, grp + kGroups / 2), mi, 0));
                        float const u1 = acc(make_coord(make_coord(1, r, grp + kGroups / 2), mi, 0));
                        store2(d_row + j, s * silu(g0) * u0, s * silu(g1) * u1);
                    }
                }
            }
        }
    }

private:
    static CUTLASS_DEVICE void store2(T* p, float a, float b)
    {
        if constexpr (std::is_same_v<T, __nv_bfloat16>)
        {
            *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
        }
        else
        {
            *reinterpret_cast<__half2*>(p) = __floats2half2_rn(a, b);
        }
    }

    Params params_;
};

// Two consumer warp groups per tile, one above the other along M, each one contiguous 64-row half
// (not QMOE_SM90_LARGE_TILE_M=256, where the warp-group layout repeats down the tile).
template <class Mainloop>
constexpr bool kCooperative = cute::size(typename Mainloop::TiledMma{}) == 2 * cutlass::NumThreadsPerWarpGroup
    && cute::size<1>(typename Mainloop::TiledMma::ThrLayoutVMNK{}) == 2
    && cute::size<0>(typename Mainloop::TileShape{}) == cute::tile_size<0>(typename Mainloop::TiledMma{});

// QMOE_SKIP_PAD: the cooperative kernels' mainloop without the math of a tile's padding rows. A
// 128-row tile is two consumer warp groups of 64 rows each; where a group's rows end inside a tile
// (every group's last row tile: 57B, 4096 tokens: ~13% of the routed math is padding rows, 1024
// tokens ~50%), the warp group whose 64 rows all lie past the end has nothing to compute, yet
// CUTLASS's mainloop runs its wgmma on the zeros TMA filled in. Here that warp group only waits for
// and releases each stage (the other keeps the tensor cores to itself, as a ping-pong warp group
// does), and its accumulators, which the epilogue never stores (rows >= M), stay unset.
// How the warp groups learn where the tile's rows end: the producer (the mainloop warp's lane 0,
// the pipeline's leader, which arrives on each stage's full barrier with release semantics) writes
// M - m0 for the tile into tile_rows[stage of its first k-tile] before acquiring that stage; the
// consumers read it after their wait on that stage (acquire), before they release it. The slot is
// not written again before both warp groups have read it: the next tile to use it starts at a
// k-tile g more than Stages after this one's first (this tile has more k-tiles than stages), and
// the producer writes it only after acquiring k-tile g - 1, which needs k-tile g - 1 - Stages (at
// or after this tile's first) released by both. Hence only tiles with more k-tiles than stages use
// the slots (checked on both sides: shorter K runs unchanged). Cluster 1x1 only: there every
// consumer thread arrives on the empty barriers, so each one's read is ordered before its release.
// M comes from the problem shape the kernel hands tensors_perform_update at each group change.
// Everything else (TMA, pipeline, epilogue, tile scheduler) is CUTLASS's, unchanged.
template <class Base>
struct PadSkippingMainloop : Base
{
    using typename Base::MainloopPipeline;
    using typename Base::PipelineState;
    using typename Base::TiledMma;
    static_assert(kCooperative<Base>, "two consumer warp groups, each one contiguous half of the tile");
    static constexpr int kStages = Base::DispatchPolicy::Stages;
    static constexpr int kTileM = cute::size<0>(typename Base::TileShape{});
    static constexpr int kWarpGroupRows = kTileM / 2;

    struct TensorStorage : Base::TensorStorage
    {
        int tile_rows[kStages];
    };
    struct Arguments : Base::Arguments
    {
        int skip_pad; // 0: CUTLASS's mainloop as is
    };
    struct Params : Base::Params
    {
        int skip_pad;
    };

    template <class ProblemShape>
    static constexpr Params to_underlying_arguments(ProblemShape problem_shapes, Arguments const& args, void* workspace)
    {
        return Params{Base::to_underlying_arguments(problem_shapes, args, workspace), args.skip_pad};
    }

    // Producer: the M of the group it loads next.
    template <class InputTensors, class ProblemShape_MNKL>
    CUTLASS_DEVICE InputTensors tensors_perform_update(
        InputTensors const& input_tensors, Params const& params, ProblemShape_MNKL problem_shape_mnkl, int32_t next_batch)
    {
        group_rows_ = static_cast<int>(cute::get<0>(problem_shape_mnkl));
        return Base::tensors_perform_update(input_tensors, params, problem_shape_mnkl, next_batch);
    }

    template <class LoadInputs, class TensorMaps, class BlockCoord, class KTileIterator>
    CUTLASS_DEVICE void load(Params const& params, MainloopPipeline pipeline, PipelineState smem_pipe_write,
        LoadInputs const& load_inputs, TensorMaps const& input_tensormaps, BlockCoord const& blk_coord,
        KTileIterator k_tile_iter, int k_tile_count, int thread_idx, uint32_t block_rank_in_cluster,
        TensorStorage& shared_tensors)
    {
        if (params.skip_pad && k_tile_count > kStages)
        {
            // lane 0 of the mainloop warp: warp group thread 0, the pipeline's leader (is_leader), which
            // is the lane Base::load's elect_one_sync picks to arrive (CUTLASS requires the same)
            if (thread_idx == 0)
            {
                shared_tensors.tile_rows[smem_pipe_write.index()]
                    = group_rows_ - static_cast<int>(cute::get<0>(blk_coord)) * kTileM;
            }
            __syncwarp(); // and a compiler fence: the write stays before the arrive in Base::load
        }
        Base::load(params, pipeline, smem_pipe_write, load_inputs, input_tensormaps, blk_coord, k_tile_iter,
            k_tile_count, thread_idx, block_rank_in_cluster, shared_tensors);
    }

    // Consumer (thread_idx: 0..255 over both warp groups).
    template <class FrgTensorC>
    CUTLASS_DEVICE void mma(MainloopPipeline pipeline, PipelineState smem_pipe_read, FrgTensorC& accum, int k_tile_count,
        int thread_idx, TensorStorage& shared_tensors, Params const& params)
    {
        skipped_ = false;
        if (params.skip_pad && k_tile_count > kStages)
        {
            pipeline.consumer_wait(smem_pipe_read, pipeline.consumer_try_wait(smem_pipe_read));
            asm volatile("" ::: "memory"); // CUTLASS's wait has no memory clobber: keep the read after it
            int const rows = shared_tensors.tile_rows[smem_pipe_read.index()];
            int const warp_group = __shfl_sync(0xFFFFFFFF, thread_idx / cutlass::NumThreadsPerWarpGroup, 0);
            if (warp_group * kWarpGroupRows >= rows)
            {
                skipped_ = true;
                for (int k = 0; k < k_tile_count; ++k, ++smem_pipe_read)
                {
                    pipeline.consumer_wait(smem_pipe_read, pipeline.consumer_try_wait(smem_pipe_read));
                    pipeline.consumer_release(smem_pipe_read);
                }
                return;
            }
        }
        Base::mma(pipeline, smem_pipe_read, accum, k_tile_count, thread_idx, shared_tensors, params);
    }

    // A warp group that skipped released every stage in mma().
    CUTLASS_DEVICE void mma_tail(MainloopPipeline pipeline, PipelineState smem_pipe_release, int k_tile_count)
    {
        if (!skipped_)
        {
            Base::mma_tail(pipeline, smem_pipe_release, k_tile_count);
        }
    }

private:
    int group_rows_ = 0;
    bool skipped_ = false;
};

// D[M, N] (row-major) = A[M, K] (row-major) . B where B is the weight W[N, K] (row-major), i.e. B
// column-major: every operand is K-contiguous or N-contiguous with one leading-dimension stride.
// Swapped (Config::kSwap): A is the weight, B the rows, D column-major (M contiguous).
template <typename T, typename Config>
struct GroupedGemm
{
    using E = typename CutlassType<T>::type;
    static constexpr int kAlign = 8; // 16 bytes
    using LayoutA = cutlass::layout::RowMajor;
    using LayoutB = cutlass::layout::ColumnMajor;
    using LayoutD = std::conditional_t<Config::kSwap, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;

    using CollectiveEpilogue = std::conditional_t<Config::kSwiglu,
        cutlass::epilogue::collective::detail::Sm90TmaWarpSpecializedAdapter<SwigluEpilogue<T>>,
        typename cutlass::epilogue::collective::CollectiveBuilder<cutlass::arch::Sm90,
            cutlass::arch::OpClassTensorOp, typename Config::Tile, typename Config::Cluster,
            cutlass::epilogue::collective::EpilogueTileAuto, float, float, E, LayoutD*, kAlign, E, LayoutD*, kAlign,
            typename Config::Epilogue, cutlass::epilogue::fusion::LinearCombination<E, float>>::CollectiveOp>;

    using BuiltMainloop = typename cutlass::gemm::collective::CollectiveBuilder<cutlass::arch::Sm90,
        cutlass::arch::OpClassTensorOp, E, LayoutA*, kAlign, E, LayoutB*, kAlign, float, typename Config::Tile,
        typename Config::Cluster,
        cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
            sizeof(typename CollectiveEpilogue::SharedStorage))>,
        typename Config::Kernel>::CollectiveOp;
    // Cooperative tiles (two warp groups per tile) skip the math of whole padding warp groups with
    // QMOE_SKIP_PAD; ping-pong tiles (one warp group per 64-row tile) have none to skip. Swapped tiles
    // neither: their M is weight rows (whole tiles at the 57B dims), and the wide ones' stages fill
    // shared memory to the last 128 bytes, which the stage slots would need. Nor clusters (the
    // QMOE_SM90_LARGE_CLUSTER_* knobs): see PadSkippingMainloop.
    static constexpr bool kSkipPad
        = kCooperative<BuiltMainloop> && !Config::kSwap && cute::size(typename Config::Cluster{}) == 1;
    using CollectiveMainloop = std::conditional_t<kSkipPad, PadSkippingMainloop<BuiltMainloop>, BuiltMainloop>;

    using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
    using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
    static_assert(Kernel::SharedStorageSize <= 227 * 1024, "fits Hopper's 227 KB of shared memory per CTA");
    using StrideA = typename Kernel::InternalStrideA;
    using StrideB = typename Kernel::InternalStrideB;
    using StrideD = typename Kernel::InternalStrideD;
};

// Per-GEMM device arrays (in the workspace), G entries each.
template <typename T>
struct GemmArrays
{
    using E = typename CutlassType<T>::type;
    using Shape3 = typename ProblemShape::UnderlyingProblemShape;
    using Stride = cute::Stride<int64_t, cute::Int<1>, cute::Int<0>>; // (leading dim, 1, batch 0)
    using StrideCol = cute::Stride<cute::Int<1>, int64_t, cute::Int<0>>; // a swapped GEMM's D (column-major)
    static_assert(sizeof(Stride) == sizeof(StrideCol), "sd holds either stride");
    Shape3* shapes;
    E const** a;
    E const** b;
    E** d;
    Stride* sa;
    Stride* sb;
    Stride* sd; // StrideCol in a swapped GEMM (col_strides)
    float const** scale; // GEMM 1 with SwiGLU in its epilogue: each entry's row weights (SwigluEpilogue)
    __host__ __device__ StrideCol* col_strides() const
    {
        return reinterpret_cast<StrideCol*>(sd);
    }
};

template <typename T>
size_t gemm_arrays_bytes(int G)
{
    using A = GemmArrays<T>;
    return align_up(G * sizeof(typename A::Shape3), 16) + 4 * align_up(G * sizeof(void*), 16)
        + 3 * align_up(G * sizeof(typename A::Stride), 16);
}

template <typename T>
GemmArrays<T> carve_gemm_arrays(char* base, int G)
{
    using A = GemmArrays<T>;
    A arr{};
    size_t off = 0;
    auto take = [&](size_t bytes) {
        char* const p = base + off;
        off += align_up(bytes, 16);
        return p;
    };
    arr.shapes = reinterpret_cast<typename A::Shape3*>(take(G * sizeof(typename A::Shape3)));
    arr.a = reinterpret_cast<typename A::E const**>(take(G * sizeof(void*)));
    arr.b = reinterpret_cast<typename A::E const**>(take(G * sizeof(void*)));
    arr.d = reinterpret_cast<typename A::E**>(take(G * sizeof(void*)));
    arr.sa = reinterpret_cast<typename A::Stride*>(take(G * sizeof(typename A::Stride)));
    arr.sb = reinterpret_cast<typename A::Stride*>(take(G * sizeof(typename A::Stride)));
    arr.sd = reinterpret_cast<typename A::Stride*>(take(G * sizeof(typename A::Stride)));
    arr.scale = reinterpret_cast<float const**>(take(G * sizeof(void*)));
    return arr;
}

__device__ __forceinline__ cute::Stride<int64_t, cute::Int<1>, cute::Int<0>> lead(int ld)
{
    return cute::make_stride(static_cast<int64_t>(ld), cute::Int<1>{}, cute::Int<0>{});
}

// Entry i: out[r, 0:n] = act[r, 0:K] . w[0:n, 0:K]^T for r < rows (pitches lda, ldw, ldo), as the
// CUTLASS problem (rows, n, K), or swapped (n, rows, K) with the weight as A and out column-major.
template <typename T>
__device__ void set_entry(GemmArrays<T> const& g, int i, bool swap, int rows, int n, int K, T const* act, int lda,
    T const* w, int ldw, T* out, int ldo)
{
    using E = typename CutlassType<T>::type;
    E const* const pa = reinterpret_cast<E const*>(act);
    E const* const pw = reinterpret_cast<E const*>(w);
    g.shapes[i] = swap ? cute::make_shape(n, rows, K) : cute::make_shape(rows, n, K);
    g.a[i] = swap ? pw : pa;
    g.b[i] = swap ? pa : pw;
    g.sa[i] = lead(swap ? ldw : lda);
    g.sb[i] = lead(swap ? lda : ldw);
    g.d[i] = reinterpret_cast<E*>(out);
    if (swap)
    {
        g.col_strides()[i] = cute::make_stride(cute::Int<1>{}, static_cast<int64_t>(ldo), cute::Int<0>{});
    }
    else
    {
        g.sd[i] = lead(ldo);
    }
}

// GEMM 1 entry i. Routed expert e < a.E: its gate/up over its gathered rows of xg (from its
// permuted row offset). Shared expert (e == a.E): weight rows [piece * w, (piece + 1) * w) of its
// 2*Is, w = 2*Is / parts, over x itself; its act rows start at T*k. Output pitch 2N (N = I or Is):
// the piece's gate/up columns at the same offsets, or with SwiGLU in the epilogue (swiglu_in_gemm1)
// its w / 2 intermediate columns from column piece * w / 2 (w a multiple of 256: shared_gemm1_parts).
template <typename T>
__device__ void set_gemm1_entry(MoeArgs const& a, T const* xg, GemmArrays<T> const& g1, int i, int e, int piece,
    int parts, bool swap)
{
    bool const fused = swiglu_in_gemm1(a);
    bool const routed = e < a.E;
    int const pitch = routed ? 2 * a.I : 2 * a.Is;
    int const w = pitch / parts; // a multiple of 8 (shared_gemm1_parts)
    int64_t const row0 = routed ? a.group_offset[e] : static_cast<int64_t>(a.T) * a.k;
    T const* const b = routed ? static_cast<T const*>(a.gate_up_w) + static_cast<int64_t>(e) * 2 * a.I * a.H
                              : static_cast<T const*>(a.shared_gate_up_w);
    set_entry<T>(g1, i, swap, routed ? a.group_count[e] : a.T, w, a.H,
        routed ? xg + row0 * a.H : static_cast<T const*>(a.x), a.H, b + static_cast<int64_t>(piece) * w * a.H, a.H,
        static_cast<T*>(a.act) + sm90_act_row(row0, a.T, a.k, a.I, a.Is) + static_cast<int64_t>(piece) * (fused ? w / 2 : w),
        pitch);
    g1.scale[i] = !routed && a.shared_unscaled ? nullptr : a.row_weight + row0; // nullptr: [Combine] applies it
}

// Problem shapes, operand pointers and strides of both GEMMs, one thread per entry, in the tile
// scheduler's order (sched_entry): the shared expert's pieces first, or spread among the routed
// experts with QMOE_SHARED_INTERLEAVE. GEMM 1: the routed experts and parts1 column slices of the
// shared expert (a.shared_parts, or 0 when the side stream runs it). GEMM 2: the routed experts and
// the shared expert's down projection as S = a.shared_splits K-slices (slice s writes y rows
// [T*k + s*T, T*k + (s+1)*T), summed by [Combine]).
template <typename T>
__global__ void setup_kernel(
    MoeArgs a, T const* xg, int parts1, bool swap1, bool swap2, GemmArrays<T> g1, GemmArrays<T> g2)
{
    int const S = a.has_shared ? a.shared_splits : 0;
    int const G1 = a.E + parts1;
    int const G2 = a.E + S;
    bool const spread = a.interleave != 0;
    int64_t const shared_row0 = static_cast<int64_t>(a.T) * a.k;
    T* const gu_shared = static_cast<T*>(a.act) + sm90_act_row(shared_row0, a.T, a.k, a.I, a.Is);
    pdl_enter();
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < max(G1, G2); i += gridDim.x * blockDim.x)
    {
        if (i < G1)
        {
            int const s = sched_entry(i, a.E, parts1, spread);
            set_gemm1_entry(a, xg, g1, i, s >= 0 ? a.E : -1 - s, s >= 0 ? s : 0, s >= 0 ? parts1 : 1, swap1);
        }
        if (i < G2)
        {
            int const s = sched_entry(i, a.E, S, spread);
            if (s >= 0)
            {
                int const part = a.Is / S; // a multiple of 8 (shared_splits_for)
                set_entry<T>(g2, i, swap2, a.T, a.H, part, gu_shared + static_cast<int64_t>(s) * part, 2 * a.Is,
                    static_cast<T const*>(a.shared_down_w) + static_cast<int64_t>(s) * part, a.Is,
                    static_cast<T*>(a.y) + (shared_row0 + static_cast<int64_t>(s) * a.T) * a.H, a.H);
            }
            else
            {
                int const e = -1 - s;
                int64_t const row0 = a.group_offset[e];
                set_entry<T>(g2, i, swap2, a.group_count[e], a.H, a.I,
                    static_cast<T*>(a.act) + sm90_act_row(row0, a.T, a.k, a.I, a.Is), 2 * a.I,
                    static_cast<T const*>(a.down_w) + static_cast<int64_t>(e) * a.H * a.I, a.I,
                    static_cast<T*>(a.y) + row0 * a.H, a.H);
            }
        }
    }
}

// QMOE_SHARED_STREAM: the one entry of the side stream's GEMM 1 (the shared expert's gate/up, whole),
// from sizes alone: it needs nothing from the routing, so it runs beside it.
template <typename T>
__global__ void setup_shared_kernel(MoeArgs a, bool swap, GemmArrays<T> gs)
{
    pdl_enter();
    if (blockIdx.x == 0 && threadIdx.x == 0)
    {
        set_gemm1_entry<T>(a, nullptr, gs, 0, a.E, 0, 1, swap);
    }
}

// xg[r] = x[row_token[r]] for the routed rows, 16 bytes per thread step.
template <typename T>
__global__ void __launch_bounds__(256) gather_kernel(MoeArgs a, T* xg)
{
    int const chunks = a.H / 8;
    int64_t const total = static_cast<int64_t>(a.T) * a.k * chunks;
    T const* const x = static_cast<T const*>(a.x);
    pdl_enter();
    for (int64_t i = blockIdx.x * 256LL + threadIdx.x; i < total; i += static_cast<int64_t>(gridDim.x) * 256)
    {
        int64_t const r = i / chunks;
        int const c = static_cast<int>(i % chunks) * 8;
        *reinterpret_cast<uint4*>(xg + r * a.H + c)
            = load_cached16(x + static_cast<int64_t>(a.row_token[r]) * a.H + c);
    }
}

// gu[r, 0:N] = w(r) * silu(gu[r, 0:N]) * gu[r, N:2N] for every row (routed N = I, shared N = Is).
// Each thread reads its gate and up chunks before writing the gate chunk: in place is safe.
template <typename T>
__global__ void __launch_bounds__(256) swiglu_kernel(MoeArgs a)
{
    int64_t const routed_chunks = static_cast<int64_t>(a.T) * a.k * (a.I / 8);
    int64_t const total = routed_chunks + static_cast<int64_t>(a.has_shared) * a.T * (a.Is / 8);
    T* const gu = static_cast<T*>(a.act);
    T* const gu_shared = gu + sm90_act_row(static_cast<int64_t>(a.T) * a.k, a.T, a.k, a.I, a.Is);
    pdl_enter();
    for (int64_t i = blockIdx.x * 256LL + threadIdx.x; i < total; i += static_cast<int64_t>(gridDim.x) * 256)
    {
        bool const routed = i < routed_chunks;
        int64_t const j = routed ? i : i - routed_chunks;
        int const n = routed ? a.I : a.Is;
        int64_t const r = j / (n / 8);
        int const c = static_cast<int>(j % (n / 8)) * 8;
        T* const row = (routed ? gu : gu_shared) + r * 2 * n;
        float const w = a.row_weight[routed ? r : static_cast<int64_t>(a.T) * a.k + r];
        float g[8];
        float u[8];
        unpack8<T>(*reinterpret_cast<uint4 const*>(row + c), g);
        unpack8<T>(*reinterpret_cast<uint4 const*>(row + n + c), u);
#pragma unroll
        for (int q = 0; q < 8; ++q)
        {
            g[q] = w * silu(g[q]) * u[q];
        }
        *reinterpret_cast<uint4*>(row + c) = pack8<T>(g);
    }
}

// Scratch (a.sm90_scratch, kSm90ScratchBytes): GEMM 1 and GEMM 2 arrays, the side stream's one-entry
// arrays, then CUTLASS's workspace (TMA descriptors, 64-byte aligned) split in two halves: the main
// stream's GEMMs and the side stream's, which run at the same time.
template <typename T>
struct Sm90Scratch
{
    GemmArrays<T> g1, g2, gs;
    void* ws[2];
    size_t ws_bytes;
};

template <typename T>
Sm90Scratch<T> carve_scratch(MoeArgs const& a)
{
    char* const base = static_cast<char*>(a.sm90_scratch);
    constexpr int kMaxEntries = kMaxExperts + std::max(kMaxSharedParts, kMaxSharedSplits);
    size_t const arrays = gemm_arrays_bytes<T>(kMaxEntries);
    Sm90Scratch<T> s{};
    s.g1 = carve_gemm_arrays<T>(base, kMaxEntries);
    s.g2 = carve_gemm_arrays<T>(base + arrays, kMaxEntries);
    s.gs = carve_gemm_arrays<T>(base + 2 * arrays, 1);
    size_t const ws_offset = align_up(2 * arrays + gemm_arrays_bytes<T>(1), 256);
    s.ws_bytes = (kSm90ScratchBytes - ws_offset) / 2 / 256 * 256;
    s.ws[0] = base + ws_offset;
    s.ws[1] = base + ws_offset + s.ws_bytes;
    return s;
}

// QMOE_GEMM_PDL: a CUTLASS kernel body behind griddepcontrol.wait, launched with the PDL attribute.
// CUTLASS 4.2's pointer-array sm90 kernels have no griddepcontrol calls of their own (IsGdcEnabled is
// false), so CUTLASS never launches them that way. Waiting before the body touches memory keeps them
// exactly ordered after the kernel before them (setup or SwiGLU), which completes and flushes first;
// what is gained is the launch: the GEMM's CTAs are resident, waiting, as that kernel drains.
// Triggering at once lets the kernel after it (SwiGLU, GEMM 2 or [Combine], which wait too) launch early
// as well: its CTAs can only become resident where a GEMM CTA has left (one holds a whole SM's
// registers), and the trigger fires only once every GEMM CTA is running, so nothing it needs is held.
template <typename Kernel>
__global__ void __launch_bounds__(Kernel::MaxThreadsPerBlock, Kernel::MinBlocksPerMultiprocessor)
    pdl_gemm_kernel(CUTLASS_GRID_CONSTANT typename Kernel::Params const params)
{
    extern __shared__ char smem[];
    pdl_wait();
    pdl_trigger();
    Kernel op;
    op(params, smem);
}

template <typename T, typename Config>
cudaError_t run_grouped(int G, GemmArrays<T> const& arr, void* ws, size_t ws_bytes, cudaStream_t stream,
    int reserve_sms = 0, bool pdl = false)
{
    using GG = GroupedGemm<T, Config>;
    static_assert(std::is_same_v<typename GG::StrideA, typename GemmArrays<T>::Stride>, "stride type");
    static_assert(std::is_same_v<typename GG::StrideB, typename GemmArrays<T>::Stride>, "stride type");
    using StrideD = std::conditional_t<Config::kSwap, typename GemmArrays<T>::StrideCol, typename GemmArrays<T>::Stride>;
    static_assert(std::is_same_v<typename GG::StrideD, StrideD>, "stride type");
    typename GG::Gemm gemm;
    cutlass::KernelHardwareInfo hw;
    cudaError_t const err = current_device_sms(&hw.device_id, &hw.sm_count);
    if (err != cudaSuccess)
    {
        return err;
    }
    hw.sm_count = std::max(1, hw.sm_count - reserve_sms); // persistent CTAs: one per SM it may use
    StrideD* const sd = reinterpret_cast<StrideD*>(arr.sd); // the type setup_kernel wrote (set_entry)
    typename GG::Gemm::Arguments args{};
    args.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
    args.problem_shape = {G, arr.shapes, nullptr};
    if constexpr (GG::kSkipPad)
    {
        args.mainloop = {{arr.a, arr.sa, arr.b, arr.sb}, tuning().skip_pad ? 1 : 0};
    }
    else
    {
        args.mainloop = {arr.a, arr.sa, arr.b, arr.sb};
    }
    args.hw_info = hw;
    if constexpr (Config::kSwiglu)
    {
        args.epilogue = {arr.d, sd, arr.scale};
    }
    else
    {
        args.epilogue = {{}, const_cast<typename GG::E const**>(arr.d), sd, arr.d, sd};
        args.epilogue.thread.alpha = 1.0f;
        args.epilogue.thread.beta = 0.0f; // C is never read
    }
    // Tiles in entry order; inside an entry along M (the row tiles of one weight tile go to
    // neighbouring CTAs together, so all but one find it in L2), swapped along N (the weight is M there).
    using Raster = decltype(args.scheduler.raster_order);
    args.scheduler.raster_order = Config::kSwap ? Raster::AlongN : Raster::AlongM;
    if (GG::Gemm::get_workspace_size(args) > ws_bytes)
    {
        return cudaErrorInvalidValue;
    }
    if (gemm.initialize(args, ws, stream) != cutlass::Status::kSuccess)
    {
        return cudaErrorInvalidValue;
    }
    // Cluster launches (the QMOE_SM90_LARGE_CLUSTER_* benchmark knobs) go through CUTLASS's own
    // launcher, which sets the cluster dimension launch_kernel does not.
    if (pdl && cute::size(typename Config::Cluster{}) == 1)
    {
        using Kernel = typename GG::Kernel;
        int const smem = Kernel::SharedStorageSize;
        cudaError_t const err = cudaFuncSetAttribute(
            pdl_gemm_kernel<Kernel>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
        return err != cudaSuccess ? err
                                  : launch_kernel(pdl_gemm_kernel<Kernel>, GG::Gemm::get_grid_shape(gemm.params()),
                                      Kernel::get_block_shape(), smem, stream, true, gemm.params());
    }
    if (gemm.run(stream) != cutlass::Status::kSuccess)
    {
        cudaError_t const err = cudaGetLastError();
        return err != cudaSuccess ? err : cudaErrorLaunchFailure;
    }
    return cudaGetLastError();
}

// Tile height from the mean rows per group: 64-row ping-pong tiles below tuning().tile_rows
// (QMOE_TILE_ROWS, default 48), 128-row cooperative tiles from there. For the routed experts that is
// T*k/E (57B: 48 rows at 384 tokens), for the side stream's shared group T. A group pads its rows to
// whole tiles: at 512 tokens of the 57B model (64 rows on average) half the experts need two 64-row
// tiles, each streaming the expert's weights (so the default is 48: one 128-row tile, twice the
// padded math; QMOE_TILE_ROWS=96 was the default until stop 20); at 4096 tokens (512 rows) 128-row
// tiles pad ~12% of the routed math, 64-row tiles ~6% (QMOE_TILE_ROWS=1048576 tests them there).
// QMOE_SWAP_AB=n: swapped tiles (SwapTiles) up to n mean rows per group instead, narrow ones up to
// kSwapNarrowMaxRows; not for GEMM 1 with SwiGLU in its epilogue (fused: weights in
// QMOE_GATE_UP_FUSED_BLOCK blocks), whose tiles must be 256 weight rows wide (its GEMM 2 may swap).
enum class Tiles
{
    kSmall,
    kLarge,
    kSwapNarrow,
    kSwapWide
};

inline Tiles tiles_for(int64_t mean_rows, bool fused)
{
    int const swap = tuning().swap_ab_rows;
    if (swap > 0 && mean_rows <= swap && !fused)
    {
        return mean_rows <= kSwapNarrowMaxRows ? Tiles::kSwapNarrow : Tiles::kSwapWide;
    }
    return mean_rows < tuning().tile_rows ? Tiles::kSmall : Tiles::kLarge;
}

inline bool swapped(Tiles t)
{
    return t == Tiles::kSwapNarrow || t == Tiles::kSwapWide;
}

// swiglu: GEMM 1 with SwiGLU in its epilogue (Fused tiles; small or large only).
template <typename T>
cudaError_t run_grouped_for(Tiles tiles, int groups, GemmArrays<T> const& arr, void* ws, size_t ws_bytes,
    cudaStream_t stream, int reserve_sms = 0, bool pdl = false, bool swiglu = false)
{
    if (swiglu)
    {
        return tiles == Tiles::kSmall
            ? run_grouped<T, Fused<SmallTiles>>(groups, arr, ws, ws_bytes, stream, reserve_sms, pdl)
            : run_grouped<T, Fused<LargeTiles>>(groups, arr, ws, ws_bytes, stream, reserve_sms, pdl);
    }
    switch (tiles)
    {
    case Tiles::kSmall: return run_grouped<T, SmallTiles>(groups, arr, ws, ws_bytes, stream, reserve_sms, pdl);
    case Tiles::kLarge: return run_grouped<T, LargeTiles>(groups, arr, ws, ws_bytes, stream, reserve_sms, pdl);
    case Tiles::kSwapNarrow:
        return run_grouped<T, SwapNarrowTiles>(groups, arr, ws, ws_bytes, stream, reserve_sms, pdl);
    case Tiles::kSwapWide: return run_grouped<T, SwapWideTiles>(groups, arr, ws, ws_bytes, stream, reserve_sms, pdl);
    }
    return cudaErrorInvalidValue;
}

// QMOE_SHARED_STREAM: the shared expert's GEMM 1 on side.stream (which already waits for the layer's
// inputs), on all SMs but side.reserve_sms, with its own half of CUTLASS's workspace.
template <typename T>
cudaError_t launch_shared_gemm1_t(MoeArgs const& a, SideLaunch const& side)
{
    Sm90Scratch<T> const s = carve_scratch<T>(a);
    bool const fused = swiglu_in_gemm1(a);
    Tiles const tiles = tiles_for(a.T, fused); // its one group has T rows (the routed groups' rule is their mean rows)
    cudaError_t const err
        = launch_kernel(setup_shared_kernel<T>, dim3(1), dim3(32), 0, side.stream, false, a, swapped(tiles), s.gs);
    return err != cudaSuccess
        ? err
        : run_grouped_for<T>(tiles, 1, s.gs, s.ws[1], s.ws_bytes, side.stream, side.reserve_sms, false, fused);
}

template <typename T>
cudaError_t launch_sm90_t(MoeArgs const& a, cudaStream_t stream, SideLaunch const* side)
{
    Sm90Scratch<T> const s = carve_scratch<T>(a);
    int const G2 = a.E + (a.has_shared ? a.shared_splits : 0);
    // GEMM 1's shared pieces: none when the side stream runs the shared expert's GEMM 1.
    int const parts1 = side != nullptr || !a.has_shared ? 0 : a.shared_parts;
    T* const xg = static_cast<T*>(a.y);

    // Our kernels may start early (pdl_wait, common.cuh); the CUTLASS GEMMs wait for full completion
    // of the kernel before them: launched plainly, or with QMOE_GEMM_PDL behind a griddepcontrol.wait
    // (pdl_gemm_kernel). The side stream's GEMM is always launched plainly (it follows an event).
    bool const pdl = a.pdl != 0;
    bool const gemm_pdl = pdl && tuning().gemm_pdl;
    // Weights in QMOE_GATE_UP_FUSED_BLOCK blocks: SwiGLU in GEMM 1's epilogue, no SwiGLU pass.
    bool const fused = swiglu_in_gemm1(a);
    int64_t const mean_rows = static_cast<int64_t>(a.T) * a.k / a.E;
    Tiles const tiles = tiles_for(mean_rows, fused); // GEMM 1
    Tiles const tiles2 = tiles_for(mean_rows, false); // GEMM 2 (may swap when GEMM 1 is fused)
    int64_t const gather_total = static_cast<int64_t>(a.T) * a.k * (a.H / 8);
    dim3 const gather_grid(static_cast<unsigned>(std::min<int64_t>((gather_total + 255) / 256, 8192)));
    cudaError_t err = launch_kernel(gather_kernel<T>, gather_grid, dim3(256), 0, stream, pdl, a, xg);
    if (err == cudaSuccess)
    {
        err = launch_kernel(
            setup_kernel<T>, dim3(1), dim3(256), 0, stream, pdl, a, xg, parts1, swapped(tiles), swapped(tiles2), s.g1,
            s.g2);
    }
    if (err == cudaSuccess)
    {
        err = run_grouped_for<T>(tiles, a.E + parts1, s.g1, s.ws[0], s.ws_bytes, stream, 0, gemm_pdl, fused);
        if (err == cudaSuccess && side != nullptr)
        {
            err = cudaStreamWaitEvent(stream, side->join, 0);
        }
    }
    if (err == cudaSuccess && !fused)
    {
        int64_t const total = static_cast<int64_t>(a.T) * (static_cast<int64_t>(a.k) * a.I + a.has_shared * a.Is) / 8;
        dim3 const grid(static_cast<unsigned>(std::min<int64_t>((total + 255) / 256, 8192)));
        err = launch_kernel(swiglu_kernel<T>, grid, dim3(256), 0, stream, pdl, a);
    }
    if (err == cudaSuccess)
    {
        err = run_grouped_for<T>(tiles2, G2, s.g2, s.ws[0], s.ws_bytes, stream, 0, gemm_pdl);
    }
    return err;
}

} // namespace
} // namespace qmoe
