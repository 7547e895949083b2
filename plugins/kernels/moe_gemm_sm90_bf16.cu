// Hopper grouped-GEMM prefill path, bf16 instantiation (see moe_gemm_sm90.cuh).
#include "moe_gemm_sm90.cuh"

namespace qmoe
{
cudaError_t launch_experts_sm90_bf16(MoeArgs const& a, cudaStream_t stream, SideLaunch const* side)
{
    return launch_sm90_t<__nv_bfloat16>(a, stream, side);
}

cudaError_t launch_shared_gemm1_sm90_bf16(MoeArgs const& a, SideLaunch const& side)
{
    return launch_shared_gemm1_t<__nv_bfloat16>(a, side);
}

} // namespace qmoe
