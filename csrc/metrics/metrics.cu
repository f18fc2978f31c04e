// CUDA kernels for the metrics op family (placeholder registration until the kernels land).
#include "common.h"

void register_metrics_cuda(pybind11::module_& m) { (void)m; }
