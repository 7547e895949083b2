"""kernels.cutlass_tile: the tile shape of a CUTLASS grouped GEMM from its demangled kernel name, as the
GPU tests (QMOE_SWAP_AB) and scripts/bench_moe_gpu.py read it from the torch profiler."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.plugins import kernels as K

# The start of a swapped kernel's name (c++filt of an sm_90a object's symbol, tile 128x80x64); the tile
# follows the mainloop's cluster shape (1x1x1), and a later triple (2x1x1) is the warp-group layout.
SWAPPED = ("void cutlass::device_kernel<cutlass::gemm::kernel::GemmUniversal<cutlass::gemm::GroupProblemShape<"
           "cute::tuple<int, int, int> >, cutlass::gemm::collective::CollectiveMma<cutlass::gemm::"
           "MainloopSm90ArrayTmaGmmaWarpSpecialized<7, cute::tuple<cute::C<1>, cute::C<1>, cute::C<1> >, "
           "cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>, cute::tuple<cute::C<128>, cute::C<80>, "
           "cute::C<64> >, cutlass::bfloat16_t, cute::tuple<long, cute::C<1>, cute::C<0> >*, cutlass::bfloat16_t, "
           "cute::tuple<long, cute::C<1>, cute::C<0> >*, cute::TiledMMA<cute::MMA_Atom<cute::SM90::GMMA::"
           "MMA_64x80x16_F32BF16BF16_SS<>>, cute::Layout<cute::tuple<cute::C<2>, cute::C<1>, cute::C<1> > > >")


def test_tile_of_a_cutlass_kernel() -> None:
    assert K.cutlass_tile(SWAPPED) == "128x80x64"
    # Without the space between closing brackets (other demanglers) and for the small tiles.
    small = SWAPPED.replace("C<128>, cute::C<80>", "C<64>, cute::C<256>").replace(" >", ">")
    assert K.cutlass_tile(small) == "64x256x64"


def test_tile_of_the_fused_swiglu_gemm() -> None:
    """GEMM 1 with SwiGLU in its epilogue (gate_up_block 128): the same mainloop, the epilogue adapter
    named at the end (what the GPU tests look for)."""
    fused = (SWAPPED.replace("C<128>, cute::C<80>", "C<128>, cute::C<256>")
             + ", cutlass::epilogue::collective::detail::Sm90TmaWarpSpecializedAdapter<qmoe::(anonymous namespace)::"
               "SwigluEpilogue<__nv_bfloat16> >, void, void> >")
    assert K.cutlass_tile(fused) == "128x256x64"


def test_tile_of_a_gemm_that_skips_padding_math() -> None:
    """Cooperative GEMMs (QMOE_SKIP_PAD): CUTLASS's mainloop wrapped in PadSkippingMainloop, which
    adds no compile-time triple before the tile."""
    wrapped = SWAPPED.replace("C<128>, cute::C<80>", "C<128>, cute::C<256>").replace(
        "cutlass::gemm::collective::CollectiveMma<",
        "qmoe::(anonymous namespace)::PadSkippingMainloop<cutlass::gemm::collective::CollectiveMma<")
    assert "PadSkippingMainloop" in wrapped
    assert K.cutlass_tile(wrapped) == "128x256x64"


def test_no_tile_for_other_or_truncated_names() -> None:
    assert K.cutlass_tile("void qmoe::(anonymous namespace)::combine_kernel<__nv_bfloat16>(qmoe::MoeArgs)") is None
    # Nsight Compute cuts long names before the tile.
    assert K.cutlass_tile("cutlass::device_kernel<cutlass::GemmUniversal<cutlass::GroupProblemShape<cute::tuple<int, "
                          "int, int>>, cutlass::CollectiveMma<cutlass::MainloopSm90ArrayTm") is None
    assert K.cutlass_tile(SWAPPED.split("cutlass::gemm::KernelPtrArray")[0]) is None  # the cluster shape only


def _bench_module():
    path = Path(__file__).resolve().parents[2] / "scripts" / "bench_moe_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_moe_gpu", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_routed_tile_math_of_the_benchmark() -> None:
    """scripts/bench_moe_gpu.py prints how much of the routed GEMMs' tile math is padding (what
    QMOE_SKIP_PAD takes away): rows 1, 64, 65, 129 and 0 pad to 64+64+128+192 = 448 (64-row
    granularity) or 128+128+128+256 = 640 of 259 useful rows."""
    tile_math = _bench_module().routed_tile_math
    got = tile_math([1, 64, 65, 129, 0])
    assert got == {"tiles64": 448 / 259, "tiles128": 640 / 259, "tiles128_skip_pad": 448 / 259}
    assert tile_math([128, 256]) == {"tiles64": 1.0, "tiles128": 1.0, "tiles128_skip_pad": 1.0}
    with pytest.raises(ValueError):
        tile_math([0, 0])
