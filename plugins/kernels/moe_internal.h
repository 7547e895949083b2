// Internal to libqmoe_kernels: the workspace layout and the argument block every MoE kernel gets.
//
// Groups: routed expert e is group e (0 <= e < E); the shared expert, when Is > 0, is group E and
// holds every token. Permuted rows: routed rows [0, T*k) grouped by expert, then shared rows
// [T*k, T*k + T) in token order. Per-group row counts and offsets live in the workspace (they are
// only known on the device), so every grouped kernel derives its own work list from them and runs
// persistent CTAs over it: groups without rows contribute no work.
#pragma once

#include "qmoe_kernels.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace qmoe
{

constexpr int kMaxExperts = 256;
constexpr int kMaxGroups = kMaxExperts + 1;
constexpr int kMaxTopK = 32;
constexpr int kMaxTokens = 1 << 24;
constexpr int kMaxHidden = 16384; // the router stages 4 token rows of H in shared memory (16 if H <= 5120)
constexpr int kDefaultDecodeMaxTokens = 8;
// Hopper with CUTLASS: decode up to 3 tokens (until stop 21: 4). At 4 tokens the grouped GEMMs beat
// the GEMV decode path by 17% on the H200 (stop 20: 0.530 vs 0.637 ms) and tied on the H100 of run 4
// (0.751 vs 0.749 ms, before PDL and the split shared down projection, which on the H200 made the
// decode path slower at 4 tokens, 0.619 -> 0.637, and the GEMMs barely, 0.522 -> 0.530). At 1 token
// the decode path wins (H200 0.257 vs 0.270, H100 0.335 vs 0.367); 2-3 tokens were not timed.
constexpr int kDefaultDecodeMaxTokensSm90 = 3;

// Hopper grouped GEMMs (moe_gemm_sm90.cuh, CUTLASS) are compiled in when CMake found CUTLASS. They
// keep gate and up side by side (act rows of 2*I) and need a small scratch area for their per-group
// arrays and CUTLASS's own workspace.
#ifdef QMOE_HAS_SM90_GEMM
constexpr bool kHasSm90Gemm = true;
#else
constexpr bool kHasSm90Gemm = false;
#endif

// Schedule switches, read once per process from the environment (TensorRT-LLM does the same with
// TRTLLM_ENABLE_PDL). They choose kernels, never the workspace size: an engine built under one
// setting runs under any other. Defaults: what the H200 lease of stop 20 measured to win
// (plugins/results/NOTES.md, h200-run5); each can be set back ("0" or a number).
//   QMOE_PDL             programmatic dependent launch between the layer's kernels (pdl_enabled();
//                        rules in common.cuh). Default on; 0 = off
//   QMOE_ROUTER_TC       router logits on tensor cores (split-K WMMA) instead of CUDA cores.
//                        Default on; 0 = off
//   QMOE_PERMUTE_CTAS=n  the permutation on up to n CTAs (count + place kernels) above
//                        kPermuteSlotsPerCta routed slots; 1 = one CTA for every size. Default 64
//   QMOE_DECODE_SPLIT    GEMV decode: the shared expert's down projection in shared_splits_for()
//                        K-slices, so its work units are as long as a routed expert's. Default on
//   QMOE_SHARED_STREAM=n Hopper prefill path: the shared expert's GEMM 1 runs on a side stream on
//                        all SMs but n, beside the router, permutation and gather; 0 = off at every
//                        size. Unset: shared_stream_sms_for() (kAutoStreamSms up to
//                        kAutoStreamMaxRows mean routed rows per expert, off above)
//   QMOE_DECODE_MMA=n    decode path with tensor-core inner products (moe_gemv.cu, MMA), taken by
//                        AUTO up to n tokens (unless the call sets decode_max_tokens); its shared
//                        expert's down projection in shared_splits_for() K-slices (0 = off, default)
//   QMOE_SHARED_INTERLEAVE=n Hopper prefill path: the shared expert's work spread evenly among the
//                        routed experts' in both grouped GEMMs (sched_entry), GEMM 1's in up to n
//                        column slices (shared_gemm1_parts), instead of first and whole; 0 = off at
//                        every size. Unset: interleave_parts() (spread between kAutoInterleaveMinRows
//                        and kAutoInterleaveMaxRows mean routed rows per expert)
//   QMOE_TILE_ROWS=n     Hopper GEMMs: 128-row tiles from n mean rows per group (default 48)
//   QMOE_SWAP_AB=n       Hopper GEMMs: swapped operands (the weights as M in 128-row tiles, a group's
//                        rows as N in tiles of 32 or 80) up to n mean rows per group, before
//                        QMOE_TILE_ROWS's choice (moe_gemm_sm90.cuh, SwapTiles; 0 = off, default)
//   QMOE_GEMM_PDL        Hopper GEMMs on the main stream launched with programmatic dependent launch
//                        too, their body behind griddepcontrol.wait (pdl_gemm_kernel); only with
//                        QMOE_PDL in effect. Default off
//   QMOE_SKIP_PAD        Hopper GEMMs in 128-row cooperative tiles: the warp group whose 64 rows all
//                        lie past its group's last row skips its math (moe_gemm_sm90.cuh,
//                        PadSkippingMainloop). Default off
//   QMOE_DECODE_MAX_TOKENS=n AUTO takes the decode path up to n tokens (a call's decode_max_tokens
//                        still wins); unset or 0: 3 on Hopper with CUTLASS (kDefaultDecodeMaxTokensSm90),
//                        8 elsewhere, or QMOE_DECODE_MMA's n
struct Tuning
{
    bool pdl;
    bool router_tc;
    int permute_ctas;
    bool decode_split;
    int shared_stream_sms; // SMs left to the routing chain while the side stream's GEMM runs; 0 = off,
                           // kSharedStreamAuto: shared_stream_sms_for() decides per call
    int decode_mma_tokens; // AUTO's decode threshold with the MMA decode path; 0 = off (FMA decode)
    int shared_interleave; // most GEMM 1 column slices of the spread shared expert; 0 = off (shared first),
                           // kInterleaveAuto: interleave_parts() decides per call
    int tile_rows;         // Hopper GEMMs: 64-row tiles for groups of fewer mean rows, 128-row tiles from here
    int decode_max_tokens; // AUTO's decode threshold; 0 = the default for the GPU and path
    int swap_ab_rows;      // Hopper GEMMs: swapped operands up to this many mean rows per group; 0 = off
    bool gemm_pdl;         // Hopper GEMMs launched with PDL behind a griddepcontrol.wait (needs pdl)
    bool skip_pad;         // Hopper cooperative GEMM tiles: no math for a warp group of padding rows
};
Tuning const& tuning();
constexpr int kMaxSharedStreamSms = 64;
constexpr int kMaxDecodeMmaTokens = 512;
constexpr int kMaxSharedParts = 64; // QMOE_SHARED_INTERLEAVE's most GEMM 1 slices
constexpr int kDefaultTileRows = 48; // QMOE_TILE_ROWS when unset (until stop 20: 96)
constexpr int kDefaultPermuteCtas = 64; // QMOE_PERMUTE_CTAS when unset
constexpr int kInterleaveAuto = -1;  // QMOE_SHARED_INTERLEAVE unset
constexpr int kSharedStreamAuto = -1; // QMOE_SHARED_STREAM unset
// QMOE_SHARED_STREAM unset: the side stream with kAutoStreamSms SMs left to the routing chain while
// the routed experts average at most kAutoStreamMaxRows rows (57B: up to 64 tokens), where its
// gather is small. Measured on the H200 (stop 20, 57B dims, each alone against the old schedule in
// one call): 8 tokens -3.1%, 64 tokens -2.0%; with PDL, the tensor-core router and the rest of
// today's default (combination B vs A): -1.7% and -0.6%. At 512 tokens +1.6% and at 4096 +3.9% (the
// gather on 8 SMs took 124 us instead of 10), hence the range.
constexpr int kAutoStreamSms = 8;
constexpr int64_t kAutoStreamMaxRows = 8;
// QMOE_SHARED_INTERLEAVE unset: the shared expert is spread in kAutoInterleaveParts slices while the
// routed experts average kAutoInterleaveMinRows..kAutoInterleaveMaxRows rows (57B: 384-1024 tokens).
// Measured on the H200 (stop 20, 57B dims, spread vs shared first): 1.5% slower at 8 rows (64
// tokens), 2% at 16 (128), 1.5% at 32 (256); 6% faster at 64 (512 tokens, with 128-row tiles from
// 48 rows), 1% at 128 (1024); 2-3% slower at 256 and 512 (2048, 4096 tokens).
constexpr int kAutoInterleaveParts = 32;
constexpr int64_t kAutoInterleaveMinRows = 48;
constexpr int64_t kAutoInterleaveMaxRows = 128;
constexpr int kMaxTileRows = 1 << 20;
// QMOE_SWAP_AB: narrow swapped tiles (QMOE_SM90_SWAP_NARROW_N rows, 32) up to this many mean rows
// per group (57B routed: 96 tokens; max rows about twice the mean there), wide ones above.
constexpr int64_t kSwapNarrowMaxRows = 12;

// QMOE_SHARED_STREAM: where the shared expert's GEMM 1 was launched, the event [Experts] waits on
// after its GEMM 1 (before SwiGLU or, with SwiGLU in GEMM 1's epilogue, GEMM 2), and how many SMs
// that GEMM leaves free.
struct SideLaunch
{
    cudaStream_t stream;
    cudaEvent_t join;
    int reserve_sms;
};

constexpr int kMaxRouterSplits = 16;
constexpr int64_t kRouterSplitRows = 4096;
// K splits the workspace always has room for (since stop 21; before, 1 from 4096 tokens). The H200
// lease of stop 20 timed the tensor-core router at 72 us for 4096 tokens with one split: 128 CTAs of
// 5 warps, one per SM, a two-stage pipeline each, latency-bound (29 MB of x); 3-4 splits give
// 384-512 CTAs, ~3 per SM. Costs T * 4 * (E + 1) * 4 bytes (57B, 4096 tokens: 4.3 MB).
constexpr int64_t kRouterLargeSplits = 4;
constexpr int kMaxPermuteCtas = 128;
constexpr int kPermuteSlotsPerCta = 1024;

// Rows of fp32 partial router logits the workspace holds for T tokens: 16 splits up to 256 tokens,
// then 4096 rows, then 4 splits (from 1024 tokens). Non-decreasing in T (see workspace_layout).
inline int64_t router_partial_rows(int64_t T)
{
    return std::max<int64_t>(kRouterLargeSplits * T, std::min<int64_t>(kMaxRouterSplits * T, kRouterSplitRows));
}

// Most K splits of the tensor-core router for T tokens: splits * T <= router_partial_rows(T).
inline int router_split_cap(int64_t T)
{
    return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(kMaxRouterSplits, router_partial_rows(T) / std::max<int64_t>(T, 1))));
}

constexpr size_t kSm90ScratchBytes = size_t(4) << 20;
constexpr int kMaxSharedSplits = 8;

// The shared expert's down projection (K = Is, e.g. 20480) splits along K into this many parts when
// T is small, so that its few long work items do not form the tail of a persistent grid: the sm90
// path's grouped GEMM (ceil(H/256) output tiles per 64 rows), and with QMOE_DECODE_SPLIT=1 or
// QMOE_DECODE_MMA the GEMV decode (its shared units would stream 8x the bytes of a routed one). Each part writes its own T
// rows of y and [Combine] adds them. The workspace always has room for them.
constexpr int64_t kSharedSplitMaxTokens = 512;

inline int shared_splits_for(int64_t T, int64_t Is)
{
    if (Is > 0 && T <= kSharedSplitMaxTokens)
    {
        for (int s = kMaxSharedSplits; s > 1; s /= 2)
        {
            if (Is % (8 * s) == 0) // every part a multiple of 8 columns (16-byte aligned)
            {
                return s;
            }
        }
    }
    return 1;
}

// QMOE_SHARED_INTERLEAVE=n: the shared expert's GEMM 1 (T rows x 2*Is columns) in this many column
// slices, at most n (a power of two): whole 256-column output tiles per slice where possible (256: a
// multiple of every tile width moe_gemm_sm90.cuh is built with, 128 or 256), else multiples of 8
// columns (16-byte aligned operands). 57B: 2*Is = 40960 -> 32 slices of 1280. whole_tiles (SwiGLU in
// GEMM 1's epilogue, whose 256-column tiles must each hold whole gate/up block pairs): only the former,
// else one slice.
inline int shared_gemm1_parts(int64_t Is, int n, bool whole_tiles = false)
{
    int const most = std::min(n, kMaxSharedParts);
    int tiles = 1; // slices of whole 256-column tiles
    int cols = 1;  // slices of a multiple of 8 columns
    for (int p = 2; Is > 0 && p <= most; p *= 2)
    {
        tiles = (2 * Is) % (256 * p) == 0 ? p : tiles;
        cols = (2 * Is) % (8 * p) == 0 ? p : cols;
    }
    return tiles > 1 || whole_tiles ? tiles : cols;
}

// GEMM 1 column slices of the shared expert for a layer call (0: shared first and whole): the
// QMOE_SHARED_INTERLEAVE setting, or where it is unset, kAutoInterleaveParts within the measured range
// of mean routed rows per expert (T*k/E) and 0 elsewhere or without a shared expert.
inline int interleave_parts(int setting, int64_t T, int k, int E, int64_t Is)
{
    if (setting != kInterleaveAuto)
    {
        return setting;
    }
    int64_t const rows = T * k;
    return Is > 0 && rows >= kAutoInterleaveMinRows * E && rows <= kAutoInterleaveMaxRows * E ? kAutoInterleaveParts : 0;
}

// SMs the side stream's shared GEMM 1 leaves to the routing chain for a layer call (0: no side
// stream): the QMOE_SHARED_STREAM setting, or where it is unset kAutoStreamSms up to
// kAutoStreamMaxRows mean routed rows per expert (T*k/E) and 0 above.
inline int shared_stream_sms_for(int setting, int64_t T, int k, int E)
{
    if (setting != kSharedStreamAuto)
    {
        return setting;
    }
    return T * k <= kAutoStreamMaxRows * E ? kAutoStreamSms : 0;
}

// Entry i (0 <= i < routed + parts) of a Hopper grouped GEMM whose shared expert is in `parts` pieces:
// returns the piece (>= 0) or -1 - e for routed expert e. The scheduler hands out tiles in entry
// order. Not spread: the pieces first (the largest work first, so it never forms the tail). Spread
// (QMOE_SHARED_INTERLEAVE): piece j at entry floor(j * n / parts), n = routed + parts, evenly among
// the routed experts (one piece: first either way), so that compute-bound shared tiles (a weight
// tile reused by T/64 row tiles) run beside memory-bound routed tiles instead of before them.
__host__ __device__ inline int sched_entry(int i, int routed, int parts, bool spread)
{
    if (!spread)
    {
        return i < parts ? i : -1 - (i - parts);
    }
    int64_t const n = static_cast<int64_t>(routed) + parts;
    int const before = static_cast<int>((static_cast<int64_t>(i) * parts + n - 1) / n); // pieces in [0, i)
    int const upto = static_cast<int>((static_cast<int64_t>(i + 1) * parts + n - 1) / n);
    return upto > before ? before : -1 - (i - before);
}

struct MoeArgs
{
    int T, H, E, k, I, Is;
    int G;          // groups: E + has_shared
    int has_shared; // Is > 0
    int norm_topk_prob;
    int shared_splits; // y row blocks of the shared expert: 1, or shared_splits_for(T, Is)
    int shared_parts;  // Hopper GEMM 1 column slices of the shared expert: 1, or shared_gemm1_parts()
    int interleave;    // Hopper grouped GEMMs: shared pieces spread among the routed experts (sched_entry)
    int router_splits; // K-split partial sums in logits (<= router_split_cap(T)); the top-k kernel adds them
    int pdl;           // launch with programmatic dependent launch (QMOE_PDL=1 and a Hopper+ device)
    int gate_up_block; // qmoe_moe_params.gate_up_block: 0 = gate rows then up rows, else alternating blocks
    int shared_unscaled; // the shared expert's y rows lack its gate, which [Combine] applies: SwiGLU in
                         // the side stream's GEMM 1 epilogue runs before the router has computed the gate

    void const* x;         // [T, H]
    void const* router_w;  // [E, H]
    void const* gate_up_w; // [E, 2I, H], rows as gate_up_row()
    void const* down_w;    // [E, H, I]
    void const* shared_gate_up_w;
    void const* shared_down_w;
    void const* shared_gate_w; // [1, H]
    void* out;                 // [T, H]

    float* logits;         // [router_splits, T, E + has_shared] fp32 partial router logits, shared gate last
    int32_t* topk_ids;     // [T*k]
    float* topk_weights;   // [T*k]
    float* shared_gate;    // [T]
    int32_t* group_count;  // [G]
    int32_t* group_offset; // [G+1] first permuted row of each group
    int32_t* row_token;    // [R] token of each permuted row, R = T*k + has_shared*T
    float* row_weight;     // [R] routing weight (shared rows: sigmoid gate)
    int32_t* slot_row;     // [T*k] permuted row of (token t, choice j) at t*k + j
    int32_t* cta_count;    // [kMaxPermuteCtas, E] routed rows per expert counted by each permute CTA
    void* act;             // routed rows [T*k, I], then shared rows [T, Is] (sm90 path: [T*k, 2I], [T, 2Is])
    void* y;               // [R, H] weighted expert outputs; shared rows: shared_splits blocks of T rows
    void* sm90_scratch;    // kSm90ScratchBytes when kHasSm90Gemm, else nullptr
};

// Row of a gate/up weight matrix (one routed expert's [2*inter, H], or the shared expert's) holding
// intermediate column j of gate (up = 0) or up (up = 1), for qmoe_moe_params.gate_up_block `block`:
// 0 = gate rows 0..inter-1 then up rows (one block of inter rows), else blocks of `block` rows
// alternating gate, up.
__host__ __device__ inline int64_t gate_up_row(int j, int up, int inter, int block)
{
    int const b = block > 0 ? block : inter;
    return static_cast<int64_t>(j / b) * 2 * b + static_cast<int64_t>(up) * b + j % b;
}

// Whether the Hopper path's GEMM 1 computes SwiGLU in its epilogue (moe_gemm_sm90.cuh, SwigluEpilogue):
// the gate/up weights are in QMOE_GATE_UP_FUSED_BLOCK blocks. Asked wherever the choice matters
// (the shared expert's slices, its gate on the side stream, the GEMM setup and launches).
__host__ __device__ inline bool swiglu_in_gemm1(MoeArgs const& a)
{
    return a.gate_up_block == QMOE_GATE_UP_FUSED_BLOCK;
}

// Element offset of permuted row `row` in the Hopper path's act buffer, which keeps gate and up side
// by side: the T*k routed rows of 2*I elements, then the T shared rows of 2*Is (so a shared row's
// offset is not row * 2*Is). GEMM 1 writes there, SwiGLU and GEMM 2 read there.
__host__ __device__ inline int64_t sm90_act_row(int64_t row, int64_t T, int64_t k, int64_t I, int64_t Is)
{
    int64_t const routed = T * k;
    return row < routed ? row * 2 * I : routed * 2 * I + (row - routed) * 2 * Is;
}

struct WorkspaceLayout
{
    size_t logits, topk_ids, topk_weights, shared_gate, group_count, group_offset, row_token, row_weight, slot_row,
        cta_count, act, y, sm90_scratch;
    size_t total;
};

inline size_t align_up(size_t v, size_t a)
{
    return (v + a - 1) / a * a;
}

// Every term is non-decreasing in T (the rest fixed), so the size for a TensorRT profile's largest T
// covers every smaller T at run time (routedExpertsPlugin sizes once, enqueue recomputes for the
// actual T): the split-K logits reserve router_partial_rows(T), the shared expert's extra y row
// blocks min(T, kSharedSplitMaxTokens) rows each although they are used only up to that many tokens.
inline WorkspaceLayout workspace_layout(int64_t T, int64_t H, int64_t E, int64_t k, int64_t I, int64_t Is, size_t elem)
{
    constexpr size_t kAlign = 256;
    int64_t const has_shared = Is > 0 ? 1 : 0;
    int64_t const R = T * k + has_shared * T;
    WorkspaceLayout l{};
    size_t off = 0;
    auto take = [&](size_t bytes) {
        size_t const at = off;
        off = align_up(off + bytes, kAlign);
        return at;
    };
    l.logits = take(sizeof(float) * router_partial_rows(T) * (E + has_shared));
    l.topk_ids = take(sizeof(int32_t) * T * k);
    l.topk_weights = take(sizeof(float) * T * k);
    l.shared_gate = take(sizeof(float) * T);
    l.group_count = take(sizeof(int32_t) * (E + 1));
    l.group_offset = take(sizeof(int32_t) * (E + 2));
    l.row_token = take(sizeof(int32_t) * R);
    l.row_weight = take(sizeof(float) * R);
    l.slot_row = take(sizeof(int32_t) * T * k);
    l.cta_count = take(sizeof(int32_t) * kMaxPermuteCtas * E);
    l.act = take(elem * (T * k * I + has_shared * T * Is) * (kHasSm90Gemm ? 2 : 1));
    l.y = take(elem * (R + has_shared * std::min(T, kSharedSplitMaxTokens) * (shared_splits_for(1, Is) - 1)) * H);
    l.sm90_scratch = take(kHasSm90Gemm ? kSm90ScratchBytes : 0);
    l.total = off;
    return l;
}

// Schedule slot -> group: the shared expert (largest, when present) goes first so that it does not
// form the tail of a persistent grid.
__host__ __device__ inline int sched_group(int slot, int G, int has_shared)
{
    return has_shared ? (slot + G - 1) % G : slot;
}

// The current device and its SM count, asked on every call (cheap): one process may drive GPUs of
// different kinds.
inline cudaError_t current_device_sms(int* dev, int* sms)
{
    cudaError_t const err = cudaGetDevice(dev);
    return err != cudaSuccess ? err : cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, *dev);
}

// Compute capability of the current device as 10 * major + minor (90: Hopper, sm_90a code runs); 0 if
// it cannot be asked (the query's error is cleared so that it does not surface as a later launch's).
// Asked on every call: one process may drive GPUs of different kinds.
inline int device_capability()
{
    int dev = 0;
    int major = 0;
    int minor = 0;
    if (cudaGetDevice(&dev) != cudaSuccess
        || cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess
        || cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess)
    {
        (void) cudaGetLastError();
        return 0;
    }
    return 10 * major + minor;
}

// Whether this call may use programmatic dependent launch (moe_layer.cu): QMOE_PDL=1, a device of
// compute capability 9.0+, and kernels compiled for it (a later GPU runs this library's compute_80
// PTX, where pdl_wait() is empty).
bool pdl_enabled();

// kernel<<<grid, block, smem, stream>>>(args...), with the PDL attribute when pdl is true. Every
// kernel launched this way must call pdl_wait() before it reads what an earlier kernel wrote.
template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
    bool pdl, Args const&... args)
{
    cudaLaunchAttribute attr{};
    attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr.val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cfg.attrs = &attr;
    cfg.numAttrs = pdl ? 1 : 0;
    return cudaLaunchKernelEx(&cfg, kernel, args...);
}

// Grid for a persistent kernel: enough CTAs to fill every SM, never more than the work upper bound.
template <typename Kernel>
cudaError_t persistent_grid(Kernel kernel, int threads, size_t smem, int64_t upper, int* grid)
{
    int dev = 0;
    int sms = 0;
    int per_sm = 0;
    cudaError_t err = current_device_sms(&dev, &sms);
    if (err == cudaSuccess)
    {
        err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem);
    }
    if (err != cudaSuccess)
    {
        return err;
    }
    int64_t const full = static_cast<int64_t>(std::max(sms, 1)) * std::max(per_sm, 1);
    *grid = static_cast<int>(std::max<int64_t>(1, std::min(full, upper)));
    return cudaSuccess;
}

// Launchers, one per stage; each dispatches on dtype (QMOE_DTYPE_FP16 / BF16) and returns the launch error.
// last: the top-k kernel ends the sequence (qmoe_moe_route), so it triggers only after its wait.
cudaError_t launch_router(MoeArgs const& a, int dtype, int32_t* ids, float* weights, float* shared_gate,
    bool last, cudaStream_t stream);
cudaError_t launch_permute(MoeArgs const& a, cudaStream_t stream);
// mma: tensor-core inner products (QMOE_DECODE_MMA; compute capability 8.0+), else CUDA-core FMA.
cudaError_t launch_experts_decode(MoeArgs const& a, int dtype, bool mma, cudaStream_t stream);
cudaError_t launch_experts_prefill(MoeArgs const& a, int dtype, cudaStream_t stream);
cudaError_t launch_combine(MoeArgs const& a, int dtype, cudaStream_t stream);
#ifdef QMOE_HAS_SM90_GEMM
// side == nullptr: both GEMMs for every group on stream. Else launch_shared_gemm1_sm90_* ran the
// shared expert's GEMM 1 on side->stream already: GEMM 1 here covers the routed groups, and SwiGLU
// waits for side->join.
cudaError_t launch_experts_sm90_bf16(MoeArgs const& a, cudaStream_t stream, SideLaunch const* side);
cudaError_t launch_experts_sm90_fp16(MoeArgs const& a, cudaStream_t stream, SideLaunch const* side);
cudaError_t launch_shared_gemm1_sm90_bf16(MoeArgs const& a, SideLaunch const& side);
cudaError_t launch_shared_gemm1_sm90_fp16(MoeArgs const& a, SideLaunch const& side);
#endif

} // namespace qmoe
