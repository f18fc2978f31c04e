// CUDA module entry for the losses op family: intentionally empty. On GPUs the fused cubic-cosine loss runs as
// Triton kernels (kernels/losses.py): its work is GEMMs fused with an elementwise epilogue, which Triton's tl.dot
// tiles express directly, and the CUDA module links neither libtorch nor cuBLAS. fastcbm.losses.cubic lists only
// ("reference", "cpu", "triton"), so backend="cuda" raises BackendUnavailableError naming the available backends.
#include "common.h"

void register_losses_cuda(pybind11::module_& m) { (void)m; }
