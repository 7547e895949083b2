// Rotary position embedding (GPT-NeoX halves) for the query and key heads of one attention layer.
// One thread rotates V consecutive pairs (x[i], x[i + D/2]) of one head of one token; query and key
// heads of a token are one index range, so GQA (Hkv < Hq) needs nothing special.
#include "common.cuh"
#include "qmoe_kernels.h"

#include <algorithm>

namespace qmoe
{
namespace
{

constexpr int kThreads = 256;

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack
{
    T v[V];
};

struct RotaryArgs
{
    int B, S, Hq, Hkv, D, P;
    void const* q;
    void const* k;
    float const* cos;
    float const* sin;
    int64_t const* pos;
    void* q_out;
    void* k_out;
};

// V floats from a table row; 16-byte loads when V is a multiple of 4 (the launcher checked alignment).
template <int V>
__device__ __forceinline__ void load_table(float const* p, float (&out)[V])
{
    if constexpr (V % 4 == 0)
    {
#pragma unroll
        for (int i = 0; i < V; i += 4)
        {
            float4 const f = __ldg(reinterpret_cast<float4 const*>(p + i));
            out[i] = f.x;
            out[i + 1] = f.y;
            out[i + 2] = f.z;
            out[i + 3] = f.w;
        }
    }
    else
    {
#pragma unroll
        for (int i = 0; i < V; ++i)
        {
            out[i] = __ldg(p + i);
        }
    }
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads) rotary_kernel(RotaryArgs a)
{
    int const half = a.D / 2;
    int const groups = half / V;
    int const heads = a.Hq + a.Hkv;
    int64_t const total = static_cast<int64_t>(a.B) * a.S * heads * groups;
    for (int64_t idx = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; idx < total;
         idx += static_cast<int64_t>(gridDim.x) * kThreads)
    {
        int const i0 = static_cast<int>(idx % groups) * V;
        int64_t const rest = idx / groups;
        int const h = static_cast<int>(rest % heads);
        int64_t const tok = rest / heads;
        int64_t const p = min(max(a.pos[tok], int64_t{0}), static_cast<int64_t>(a.P - 1));

        bool const is_q = h < a.Hq;
        int64_t const base = is_q ? (tok * a.Hq + h) * a.D : (tok * a.Hkv + (h - a.Hq)) * a.D;
        T const* src = static_cast<T const*>(is_q ? a.q : a.k) + base;
        T* dst = static_cast<T*>(is_q ? a.q_out : a.k_out) + base;

        Pack<T, V> const x1 = *reinterpret_cast<Pack<T, V> const*>(src + i0);
        Pack<T, V> const x2 = *reinterpret_cast<Pack<T, V> const*>(src + half + i0);
        float c[V];
        float s[V];
        load_table<V>(a.cos + p * half + i0, c);
        load_table<V>(a.sin + p * half + i0, s);
        Pack<T, V> o1;
        Pack<T, V> o2;
#pragma unroll
        for (int i = 0; i < V; ++i)
        {
            float const a1 = to_float(x1.v[i]);
            float const a2 = to_float(x2.v[i]);
            o1.v[i] = from_float<T>(a1 * c[i] - a2 * s[i]);
            o2.v[i] = from_float<T>(a2 * c[i] + a1 * s[i]);
        }
        *reinterpret_cast<Pack<T, V>*>(dst + i0) = o1;
        *reinterpret_cast<Pack<T, V>*>(dst + half + i0) = o2;
    }
}

template <typename T, int V>
cudaError_t launch(RotaryArgs const& a, cudaStream_t stream)
{
    int64_t const total = static_cast<int64_t>(a.B) * a.S * (a.Hq + a.Hkv) * (a.D / 2 / V);
    int const grid = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads, 65535)));
    rotary_kernel<T, V><<<grid, kThreads, 0, stream>>>(a);
    return cudaGetLastError();
}

bool aligned(void const* p, uintptr_t a)
{
    return reinterpret_cast<uintptr_t>(p) % a == 0;
}

bool aligned16(void const* p)
{
    return aligned(p, 16);
}

// Widest vector the sizes and every pointer allow: 16 bytes of T per load, else one element.
template <typename T>
cudaError_t dispatch(RotaryArgs const& a, cudaStream_t stream)
{
    constexpr int kVec = 16 / sizeof(T);
    bool const vec = (a.D / 2) % kVec == 0 && aligned16(a.q) && aligned16(a.k)
        && aligned16(a.q_out) && aligned16(a.k_out) && aligned16(a.cos) && aligned16(a.sin);
    return vec ? launch<T, kVec>(a, stream) : launch<T, 1>(a, stream);
}

} // namespace
} // namespace qmoe

extern "C" int32_t qmoe_rotary_forward(qmoe_rotary_params const* p, cudaStream_t stream)
{
    using namespace qmoe;
    if (p == nullptr)
    {
        return QMOE_ERR_NULL_POINTER;
    }
    if (p->dtype != QMOE_DTYPE_FP16 && p->dtype != QMOE_DTYPE_BF16 && p->dtype != QMOE_DTYPE_FP32)
    {
        return QMOE_ERR_BAD_DTYPE;
    }
    if (p->batch < 0 || p->seq_len < 0 || p->num_heads < 1 || p->num_kv_heads < 1 || p->num_kv_heads > p->num_heads
        || p->head_dim < 2 || p->head_dim % 2 != 0 || p->num_positions < 1)
    {
        return QMOE_ERR_BAD_SHAPE;
    }
    if (static_cast<int64_t>(p->batch) * p->seq_len == 0)
    {
        return QMOE_OK;
    }
    if (p->query == nullptr || p->key == nullptr || p->cos == nullptr || p->sin == nullptr
        || p->position_ids == nullptr || p->query_out == nullptr || p->key_out == nullptr)
    {
        return QMOE_ERR_NULL_POINTER;
    }
    uintptr_t const elem = p->dtype == QMOE_DTYPE_FP32 ? 4 : 2;
    if (!aligned(p->query, elem) || !aligned(p->key, elem) || !aligned(p->query_out, elem) || !aligned(p->key_out, elem)
        || !aligned(p->cos, 4) || !aligned(p->sin, 4) || !aligned(p->position_ids, 8))
    {
        return QMOE_ERR_MISALIGNED;
    }
    RotaryArgs const a{p->batch, p->seq_len, p->num_heads, p->num_kv_heads, p->head_dim, p->num_positions, p->query,
        p->key, p->cos, p->sin, p->position_ids, p->query_out, p->key_out};
    cudaError_t err = cudaSuccess;
    switch (p->dtype)
    {
    case QMOE_DTYPE_FP16: err = dispatch<__half>(a, stream); break;
    case QMOE_DTYPE_BF16: err = dispatch<__nv_bfloat16>(a, stream); break;
    default: err = dispatch<float>(a, stream); break;
    }
    return err == cudaSuccess ? QMOE_OK : QMOE_ERR_CUDA;
}
