// Work lists of the grouped expert kernels. Row counts per group are only known on the device, so
// each persistent CTA builds the prefix of work items per schedule slot in shared memory (G <= 257
// values, one warp_exclusive_scan) and maps a work-item index to its slot by binary search.
#pragma once

#include "common.cuh"
#include "moe_internal.h"

namespace qmoe
{

// prefix[s + 1] = items_of_group(g(s)) summed over slots <= s; prefix[0] = 0. Returns prefix[G].
// Must be called by every thread of the block (it synchronises).
template <typename ItemsOfGroup>
__device__ int build_work_prefix(MoeArgs const& a, int* prefix, ItemsOfGroup items_of_group)
{
    for (int s = threadIdx.x; s < a.G; s += blockDim.x)
    {
        prefix[s + 1] = items_of_group(sched_group(s, a.G, a.has_shared));
    }
    __syncthreads();
    if (threadIdx.x < kWarp)
    {
        warp_exclusive_scan(prefix + 1, prefix, a.G, threadIdx.x); // in place
    }
    __syncthreads();
    return prefix[a.G];
}

// Largest slot s < G with prefix[s] <= item (requires 0 <= item < prefix[G]).
__device__ __forceinline__ int find_slot(int const* prefix, int G, int item)
{
    int lo = 0;
    int hi = G - 1;
    while (lo < hi)
    {
        int const mid = (lo + hi + 1) / 2;
        if (prefix[mid] <= item)
        {
            lo = mid;
        }
        else
        {
            hi = mid - 1;
        }
    }
    return lo;
}

} // namespace qmoe
