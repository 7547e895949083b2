// Device helpers shared by the qmoe kernels: dtype conversion, 16-byte vectors, cp.async, warp sums.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace qmoe
{

constexpr int kWarp = 32;

__device__ __forceinline__ float to_float(float v)
{
    return v;
}
__device__ __forceinline__ float to_float(__half v)
{
    return __half2float(v);
}
__device__ __forceinline__ float to_float(__nv_bfloat16 v)
{
    return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v)
{
    return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v)
{
    return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v)
{
    return __float2bfloat16_rn(v);
}

// Rounds v to T's precision and back: what a bf16/fp16 nn.Linear does to its fp32 accumulator.
template <typename T>
__device__ __forceinline__ float round_to(float v)
{
    return to_float(from_float<T>(v));
}

// 8 half-precision values packed in 16 bytes (one vector load/store).
template <typename T>
__device__ __forceinline__ void unpack8(uint4 v, float (&f)[8])
{
    static_assert(sizeof(T) == 2, "unpack8 is for 16-bit types");
    T const* h = reinterpret_cast<T const*>(&v);
#pragma unroll
    for (int i = 0; i < 8; ++i)
    {
        f[i] = to_float(h[i]);
    }
}

template <typename T>
__device__ __forceinline__ uint4 pack8(float const (&f)[8])
{
    static_assert(sizeof(T) == 2, "pack8 is for 16-bit types");
    uint4 v;
    T* h = reinterpret_cast<T*>(&v);
#pragma unroll
    for (int i = 0; i < 8; ++i)
    {
        h[i] = from_float<T>(f[i]);
    }
    return v;
}

// Streamed weights: read once, do not keep them in L1.
__device__ __forceinline__ uint4 load_stream16(void const* p)
{
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

// Activations: small and reused by many warps, keep them cached.
__device__ __forceinline__ uint4 load_cached16(void const* p)
{
    return __ldg(reinterpret_cast<uint4 const*>(p));
}

// 16-byte global->shared async copy; pred == false writes 16 zero bytes (src is not read).
__device__ __forceinline__ void cp_async16(void* smem, void const* gmem, bool pred)
{
    unsigned const dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    int const src_size = pred ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_size) : "memory");
}

__device__ __forceinline__ void cp_async_commit()
{
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <int N>
__device__ __forceinline__ void cp_async_wait()
{
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ float warp_sum(float v)
{
#pragma unroll
    for (int o = kWarp / 2; o > 0; o >>= 1)
    {
        v += __shfl_xor_sync(0xffffffffu, v, o);
    }
    return v;
}

// Exclusive prefix sum of v[0..n) into out[0..n] (out[0] = 0, out[i + 1] = v[0] + ... + v[i]) by one
// warp (all 32 lanes call it). In place with v == out + 1 is allowed: each lane reads v[i] before it
// writes out[i + 1], the same element.
__device__ inline void warp_exclusive_scan(int const* v, int* out, int n, int lane)
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

__device__ __forceinline__ float silu(float g)
{
    return g / (1.0f + __expf(-g));
}

// Programmatic dependent launch (Hopper+). A kernel launched with the PDL attribute may start once
// every CTA of the kernel before it in the stream has called pdl_trigger() (or exited);
// pdl_wait() then blocks until that kernel has completed and its writes are visible. Rules:
//   - every kernel calls pdl_wait() before it touches memory that an earlier kernel (of this layer,
//     or the one that produced the layer's inputs) writes or reads; a kernel completes only after its
//     wait, so completion of the direct predecessor implies completion of everything before it;
//   - the layer's first kernel (the router) triggers only after its wait, so that the layer's
//     inputs are complete before any of our kernels can start;
//   - most kernels trigger right after their wait (pdl_enter); the top-k and permutation kernels
//     trigger first (pdl_trigger_first), because the only code that runs before a wait downstream
//     of them (the decode gate/up kernel's shared-expert units) reads x and weights and writes rows
//     of act that none of the routing kernels touch.
// All are no-ops when the kernel was launched without the attribute, and before sm_90.
__device__ __forceinline__ void pdl_wait()
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_trigger()
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Wait, then let the next kernel launch: for kernels whose every access depends on earlier ones.
__device__ __forceinline__ void pdl_enter()
{
    pdl_wait();
    pdl_trigger();
}

// Let the next kernel launch, then wait (see the rules above for where this is allowed).
__device__ __forceinline__ void pdl_trigger_first()
{
    pdl_trigger();
    pdl_wait();
}

// Asks L2 to fetch the 128-byte line holding p (no register result, no fault on a valid address).
__device__ __forceinline__ void prefetch_l2(void const* p)
{
    asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p));
}

__host__ __device__ __forceinline__ int ceil_div(int a, int b)
{
    return (a + b - 1) / b;
}

} // namespace qmoe
