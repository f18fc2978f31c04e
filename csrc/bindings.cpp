// The one bindings file. Compiled twice: into fastcbm._C (C++ CPU kernels) and, when CUDA is built, into
// fastcbm._C_cuda with FASTCBM_CUDA_MODULE defined (CUDA kernel launchers). Each op family registers itself
// through a register_<op>_{cpu,cuda}(module) function defined next to its kernels in csrc/<op>/.
#include <pybind11/pybind11.h>

#include "common.h"

namespace py = pybind11;

#ifndef FASTCBM_CUDA_MODULE
void register_metrics_cpu(py::module_& m);
void register_prompts_cpu(py::module_& m);
void register_losses_cpu(py::module_& m);
void register_cam_cpu(py::module_& m);
#else
void register_metrics_cuda(py::module_& m);
void register_prompts_cuda(py::module_& m);
void register_losses_cuda(py::module_& m);
void register_cam_cuda(py::module_& m);
#endif

PYBIND11_MODULE(FASTCBM_MODULE_NAME, m) {
  m.doc() = "fastcbm compiled kernels (private; use the fastcbm Python API)";
  // A broken launcher invariant is a bug: raise fastcbm.errors.InternalError (imported when it first happens).
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const fastcbm::internal_error& e) {
      py::object cls = py::module_::import("fastcbm.errors").attr("InternalError");
      PyErr_SetString(cls.ptr(), e.what());
    }
  });
  m.def("build_info", []() {
    py::dict info;
#ifdef FASTCBM_WITH_OPENMP
    info["openmp"] = true;
#else
    info["openmp"] = false;
#endif
    info["max_threads"] = fastcbm::max_threads();
#ifdef __VERSION__
    info["compiler"] = __VERSION__;
#endif
#ifdef FASTCBM_CUDA_MODULE
    info["cuda"] = true;
#else
    info["cuda"] = false;
#endif
    return info;
  });
  m.def("set_num_threads", [](int n) {
#ifdef FASTCBM_WITH_OPENMP
    if (n > 0) omp_set_num_threads(n);
#endif
    (void)n;
  });
#ifndef FASTCBM_CUDA_MODULE
  register_metrics_cpu(m);
  register_prompts_cpu(m);
  register_losses_cpu(m);
  register_cam_cpu(m);
#else
  register_metrics_cuda(m);
  register_prompts_cuda(m);
  register_losses_cuda(m);
  register_cam_cuda(m);
#endif
}
