// The Python module htakl_kernels._C. The op schemas are defined once, in Python
// (htakl_kernels/_library.py, before this module is imported); the C++ files that implement them
// register their kernels with TORCH_LIBRARY_IMPL(htakl, <device>, ...). This file only makes the
// shared library importable and reports how it was built. Plain Python C API, no pybind11:
// it keeps this translation unit cheap to compile.
#include <Python.h>

namespace {

PyObject* built_with_cuda(PyObject*, PyObject*) {
#ifdef HTAKL_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyMethodDef methods[] = {
    {"built_with_cuda", built_with_cuda, METH_NOARGS, "Whether the CUDA kernels were compiled in."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&module); }
