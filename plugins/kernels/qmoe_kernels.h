/*
 * qmoe CUDA kernels: C ABI (no TensorRT types). Loaded by the TensorRT plugins (linked statically)
 * and by the Python tests/benchmark (libqmoe_kernels.so through ctypes).
 *
 * Routed-experts layer (one Qwen2-MoE sparse block), pipeline:
 *
 *   [Router]   fp32 logits (rounded to the activation dtype, as a bf16/fp16 Linear does), fp32
 *              softmax over all experts, top-k (ties -> lower expert id), optional renormalisation;
 *              shared-expert gate sigmoid(shared_expert_gate . x) in the same pass
 *   [Permute]  per-expert counts, prefix sums, permuted rows (token id + routing weight per row);
 *              the shared expert is one more group holding every token, weighted by its gate
 *   [Experts]  gate/up GEMM with fused SwiGLU -> act; down GEMM scaled by the row weight -> y.
 *              decode path (few tokens): bandwidth-bound warp dot products, weights read once;
 *              prefill path: tensor-core grouped GEMMs (Hopper: CUTLASS wgmma, SwiGLU in its own
 *              pass, or in GEMM 1's epilogue for weights in QMOE_GATE_UP_FUSED_BLOCK blocks;
 *              elsewhere WMMA bf16/fp16 with SwiGLU fused), fp32 accumulation.
 *              Groups without tokens get no work at all.
 *   [Combine]  out[t] = sum_j y[row(t, j)] + y[shared row(t)], fp32 sum in a fixed order
 *
 * Every function is asynchronous on `stream`, returns a qmoe_status and launches nothing when it
 * returns an error other than QMOE_ERR_CUDA. All tensors are dense, row-major (last index fastest).
 */
#ifndef QMOE_KERNELS_H
#define QMOE_KERNELS_H

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define QMOE_KERNELS_ABI_VERSION 2 /* 2: qmoe_moe_params.gate_up_block */

typedef enum qmoe_status {
    QMOE_OK = 0,
    QMOE_ERR_NULL_POINTER = 1,     /* a required pointer is NULL */
    QMOE_ERR_BAD_SHAPE = 2,        /* a size is out of range or not a multiple of 8 */
    QMOE_ERR_BAD_DTYPE = 3,        /* dtype not supported by this function */
    QMOE_ERR_MISALIGNED = 4,       /* a tensor is not 16-byte aligned (workspace: 256-byte) */
    QMOE_ERR_WORKSPACE = 5,        /* workspace_size < qmoe_moe_workspace_size() */
    QMOE_ERR_CUDA = 6              /* a CUDA call or kernel launch failed */
} qmoe_status;

typedef enum qmoe_dtype {
    QMOE_DTYPE_FP16 = 0,
    QMOE_DTYPE_BF16 = 1,
    QMOE_DTYPE_FP32 = 2            /* rotary only */
} qmoe_dtype;

/* qmoe_moe_params.gate_up_block for which Hopper's grouped GEMMs compute SwiGLU in GEMM 1's epilogue:
 * a 256-row tile of the weights then holds gate and up of the same 128 intermediate columns. */
#define QMOE_GATE_UP_FUSED_BLOCK 128

typedef enum qmoe_moe_path {
    QMOE_PATH_AUTO = 0,            /* decode if num_tokens <= decode_max_tokens, else prefill */
    QMOE_PATH_DECODE = 1,          /* force the bandwidth-bound path (any token count, slow if many) */
    QMOE_PATH_PREFILL = 2,         /* force the tensor-core path (Hopper: CUTLASS wgmma when built in) */
    QMOE_PATH_PREFILL_WMMA = 3     /* force the portable WMMA tensor-core path (tests, comparisons) */
} qmoe_moe_path;

/*
 * One Qwen2-MoE sparse block. T tokens, hidden H, E routed experts (top_k each), routed intermediate
 * I, shared intermediate Is (0: no shared expert). All float tensors have dtype `dtype` (fp16 or bf16);
 * accumulation is fp32. Limits: 1 <= E <= 256, 1 <= top_k <= min(E, 32); H, I, Is multiples of 8;
 * T <= 2^24. Every tensor pointer 16-byte aligned.
 */
typedef struct qmoe_moe_params {
    int32_t num_tokens;               /* T (0: nothing to do) */
    int32_t hidden_size;              /* H */
    int32_t num_experts;              /* E */
    int32_t top_k;                    /* k */
    int32_t norm_topk_prob;           /* 1: renormalise the k weights to sum to 1 */
    int32_t moe_intermediate_size;    /* I */
    int32_t shared_intermediate_size; /* Is; 0: no shared expert (shared_* pointers ignored) */
    int32_t dtype;                    /* qmoe_dtype: FP16 or BF16 */
    int32_t path;                     /* qmoe_moe_path */
    int32_t decode_max_tokens;        /* AUTO threshold; <= 0: QMOE_DECODE_MAX_TOKENS, else QMOE_DECODE_MMA's n, else 3 on Hopper with CUTLASS, 8 elsewhere */
    int32_t gate_up_block;            /* row layout of gate_up_weight and shared_gate_up_weight: 0 = gate rows then
                                         up rows (as below); b > 0 = blocks of b gate rows and b up rows
                                         alternate (gate 0..b-1, up 0..b-1, gate b..2b-1, ...; b a multiple of 8
                                         dividing I and Is). QMOE_GATE_UP_FUSED_BLOCK (128) lets Hopper's GEMMs do
                                         SwiGLU in GEMM 1's epilogue; any other b > 0 takes the portable paths */

    const void* hidden;                    /* [T, H] */
    const void* router_weight;             /* [E, H]        mlp.gate.weight */
    const void* gate_up_weight;            /* [E, 2*I, H]   rows 0..I-1 gate_proj, I..2I-1 up_proj (gate_up_block 0) */
    const void* down_weight;               /* [E, H, I]     down_proj */
    const void* shared_gate_up_weight;     /* [2*Is, H]     shared gate_proj then up_proj (gate_up_block 0) */
    const void* shared_down_weight;        /* [H, Is] */
    const void* shared_expert_gate_weight; /* [1, H] */
    void* output;                          /* [T, H]; must not alias any input */

    void* workspace;                  /* device memory, 256-byte aligned, not shared with a concurrent call */
    size_t workspace_size;            /* bytes available at `workspace` */
} qmoe_moe_params;

/* Bytes of workspace qmoe_moe_forward needs for p's sizes (pointers are not read). Grows linearly
 * with T: about T * (k + 1) * (2*H + 2*I) * sizeof(dtype) bytes plus small index arrays, and never
 * decreases as num_tokens grows (other fields fixed): the size for the largest T covers every
 * smaller one. Independent of the QMOE_* environment switches.
 * Returns 0 when the sizes are invalid (see qmoe_moe_check). */
size_t qmoe_moe_workspace_size(const qmoe_moe_params* p);

/* Validates sizes, dtype, pointers and alignment without launching anything. */
int32_t qmoe_moe_check(const qmoe_moe_params* p);

/* Runs the whole block: output = routed experts + gated shared expert. */
int32_t qmoe_moe_forward(const qmoe_moe_params* p, cudaStream_t stream);

/* Router only (for tests and debugging): writes topk_ids [T, k] int32 (expert ids, descending
 * probability), topk_weights [T, k] fp32 (after optional renormalisation) and, if Is > 0,
 * shared_gate [T] fp32 = sigmoid(shared_expert_gate . x). Reads hidden, router_weight and
 * shared_expert_gate_weight; uses the workspace like qmoe_moe_forward (same size query). */
int32_t qmoe_moe_route(const qmoe_moe_params* p, int32_t* topk_ids, float* topk_weights, float* shared_gate,
    cudaStream_t stream);

/*
 * Rotary position embedding, GPT-NeoX style (the two halves of each head rotate together):
 *   out[i]       = x[i] * cos[p, i] - x[i + D/2] * sin[p, i]
 *   out[i + D/2] = x[i + D/2] * cos[p, i] + x[i] * sin[p, i]      for i < D/2, p = position_ids[b, s]
 * applied to every query head and every key head (GQA: Hkv <= Hq). Math in fp32, one rounding.
 * Positions outside [0, P) are clamped to the table (the caller guarantees the range).
 * In-place is allowed (query_out == query, key_out == key); partial overlap is not.
 */
typedef struct qmoe_rotary_params {
    int32_t batch;          /* B */
    int32_t seq_len;        /* S */
    int32_t num_heads;      /* Hq */
    int32_t num_kv_heads;   /* Hkv */
    int32_t head_dim;       /* D, even */
    int32_t num_positions;  /* P, rows of the tables */
    int32_t dtype;          /* qmoe_dtype of query/key and outputs: FP16, BF16 or FP32 */

    const void* query;          /* [B, S, Hq*D] */
    const void* key;            /* [B, S, Hkv*D] */
    const float* cos;           /* [P, D/2] fp32 */
    const float* sin;           /* [P, D/2] fp32 */
    const int64_t* position_ids; /* [B, S] */
    void* query_out;            /* [B, S, Hq*D] */
    void* key_out;              /* [B, S, Hkv*D] */
} qmoe_rotary_params;

int32_t qmoe_rotary_forward(const qmoe_rotary_params* p, cudaStream_t stream);

/* Human-readable name of a qmoe_status value (static string). */
const char* qmoe_status_string(int32_t status);

/* Bits of qmoe_kernels_features(). All but the first are schedule switches read once per process
   from the environment; a bit is set while its switch is in effect (QMOE_PDL, QMOE_ROUTER_TC and
   QMOE_DECODE_SPLIT on by default, QMOE_PERMUTE_CTAS=n > 1 (default 64), QMOE_SHARED_STREAM unset
   ("auto") or n > 0,
   QMOE_DECODE_MMA=n > 0, QMOE_SHARED_INTERLEAVE unset ("auto") or n > 0, QMOE_TILE_ROWS=n != 48,
   QMOE_DECODE_MAX_TOKENS=n > 0, QMOE_SWAP_AB=n > 0, QMOE_GEMM_PDL on, QMOE_SKIP_PAD on); they never change
   qmoe_moe_workspace_size(). */
#define QMOE_FEATURE_SM90_GEMM 1     /* CUTLASS wgmma grouped GEMMs built in (used on compute capability 9.0) */
#define QMOE_FEATURE_PDL 2           /* programmatic dependent launch between the layer's kernels (9.0+) */
#define QMOE_FEATURE_ROUTER_TC 4     /* router logits on tensor cores (split-K WMMA) */
#define QMOE_FEATURE_PERMUTE_MULTI 8 /* token permutation on several CTAs for large batches */
#define QMOE_FEATURE_SHARED_STREAM 16 /* Hopper: shared expert's GEMM 1 on a side stream beside the routing (not forced off: also "auto") */
#define QMOE_FEATURE_DECODE_SPLIT 32  /* GEMV decode: shared expert's down projection split along K */
#define QMOE_FEATURE_DECODE_MMA 64    /* decode path on tensor cores (mma.sync), AUTO up to n tokens (8.0+) */
#define QMOE_FEATURE_SHARED_INTERLEAVE 128 /* Hopper: shared expert's GEMM tiles spread among the routed experts' (not forced off: also "auto") */
#define QMOE_FEATURE_TILE_ROWS 256    /* Hopper: QMOE_TILE_ROWS moves the 64-row / 128-row tile threshold from 48 */
#define QMOE_FEATURE_DECODE_MAX_TOKENS 512 /* QMOE_DECODE_MAX_TOKENS sets AUTO's decode threshold */
#define QMOE_FEATURE_SWAP_AB 1024     /* Hopper: swapped-operand GEMM tiles for few rows per expert (QMOE_SWAP_AB=n) */
#define QMOE_FEATURE_GEMM_PDL 2048    /* Hopper: the grouped GEMMs join programmatic dependent launch (QMOE_GEMM_PDL=1) */
#define QMOE_FEATURE_SKIP_PAD 4096    /* Hopper: 128-row GEMM tiles skip the math of a warp group of padding rows (QMOE_SKIP_PAD=1) */

/* QMOE_FEATURE_* bits: what this library was built with and the switches in effect. */
int32_t qmoe_kernels_features(void);

/* QMOE_KERNELS_ABI_VERSION of the built library, to detect a stale .so. */
int32_t qmoe_kernels_abi_version(void);

#ifdef __cplusplus
}
#endif

#endif /* QMOE_KERNELS_H */
