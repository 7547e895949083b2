// Hopper grouped-GEMM prefill path, bf16 instantiation (see moe_gemm_sm90.cuh).
#include "moe_gemm_sm90.cuh"

namespace qmoe
{
// The current device runs sm_90a code (compute capability 9.0). Asked on every call: one process
// may drive an H100 and an A100.
bool sm90_gemm_supported()
{
    int dev = 0;
    int major = 0;
    int minor = 0;
    if (cudaGetDevice(&dev) != cudaSuccess
        || cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess
        || cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess)
    {
        return false;
    }
    return major == 9 && minor == 0;
}

cudaError_t launch_experts_sm90_bf16(MoeArgs const& a, cudaStream_t stream, SideLaunch const* side)
{
    return launch_sm90_t<__nv_bfloat16>(a, stream, side);
}

cudaError_t launch_shared_gemm1_sm90_bf16(MoeArgs const& a, SideLaunch const& side)
{
    return launch_shared_gemm1_t<__nv_bfloat16>(a, side);
}

} // namespace qmoe
