// The schema of the extension's fused op, defined once for every device file.
//
//   casa::fused_score_attention(x [B, N, D], value_weight [D, D], value_bias [D],
//       enc0_weight [D/4, N, k], enc0_bias, enc1_weight [D/2, D/4, k], enc1_bias,
//       enc2_weight [D, D/2, k], enc2_bias, dec0_weight [D, D/2, k], dec0_bias,
//       dec1_weight [D/2, D/4, k], dec1_bias, dec2_weight [D/4, N, k], dec2_bias) -> [B, N, D]
//
// y = softmax_over_N(score(x)) * (x Wv^T + bv) + x, docs/design.md §2. Device implementations
// live in csrc/cpu and csrc/cuda (TORCH_LIBRARY_IMPL). The Python package exposes it
// through casa::score_attention, which adds the backend choice, fake kernel and autograd.

#include <torch/library.h>

TORCH_LIBRARY(casa, m) {
  m.def(
      "fused_score_attention(Tensor x, Tensor value_weight, Tensor value_bias, "
      "Tensor enc0_weight, Tensor enc0_bias, Tensor enc1_weight, Tensor enc1_bias, "
      "Tensor enc2_weight, Tensor enc2_bias, Tensor dec0_weight, Tensor dec0_bias, "
      "Tensor dec1_weight, Tensor dec1_bias, Tensor dec2_weight, Tensor dec2_bias) -> Tensor");
}

// `import casa_kernels._C` loads this library, whose static initialisers register the op.
// The C++ (CMake) build leaves this out and is loaded with torch.ops.load_library.
#ifdef CASA_PYTHON_MODULE
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
#endif
