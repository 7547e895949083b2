// Hopper grouped-GEMM prefill path, bf16 instantiation (see moe_gemm_sm90.cuh).
#include "moe_gemm_sm90.cuh"

namespace qmoe
{
bool sm90_gemm_supported()
{
    static bool const supported = [] {
        int dev = 0;
        int major = 0;
        if (cudaGetDevice(&dev) != cudaSuccess
            || cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess)
        {
            return false;
        }
        return major == 9; // sm_90a code only runs on compute capability 9.0
    }();
    return supported;
}

cudaError_t launch_experts_sm90_bf16(MoeArgs const& a, cudaStream_t stream)
{
    return launch_sm90_t<__nv_bfloat16>(a, stream);
}

} // namespace qmoe
