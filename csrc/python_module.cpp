// Makes the shared library importable as the Python module cmbn_ext._C; importing it runs the
// TORCH_LIBRARY_IMPL registrations. It exposes no Python functions: callers use torch.ops.cmbn_ext.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",     // name
      nullptr,  // docstring
      -1,       // no per-module state
      nullptr,  // no methods
  };
  return PyModule_Create(&module_def);
}
}
