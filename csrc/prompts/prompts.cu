// CUDA kernels for the prompts op family (placeholder registration until the kernels land).
#include "common.h"

void register_prompts_cuda(pybind11::module_& m) { (void)m; }
