// The Python module `tvr_kernels._C`. It holds no Python functions: importing it loads the
// shared library, whose static initialisers register the `tvr_C::*` kernels with the torch
// dispatcher (TORCH_LIBRARY_FRAGMENT in each csrc/cpu/<op>.cpp). This avoids pybind11 and
// keeps the op files free of Python headers.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
